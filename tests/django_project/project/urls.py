from django.urls import path

from pooltest import views

urlpatterns = [
    path("create/<str:name>/", views.create),
    path("create-then-fail/<str:name>/", views.create_then_fail),
    path("backend-pid/", views.backend_pid),
]
