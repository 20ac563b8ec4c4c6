from django.urls import path

from . import views

urlpatterns = [
    path("health", views.health),
    path("read", views.read),
    path("write", views.write),
    path("slow", views.slow),
]
