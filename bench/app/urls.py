from django.urls import path

from . import views

urlpatterns = [
    path("health", views.health),
    path("read", views.read),
    path("slow", views.slow),
    path("session", views.session),
]
