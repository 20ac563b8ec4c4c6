"""Views of guide_settings: a short query in each request's transaction, and a health check."""
from django.db import connection
from django.http import HttpResponse
from django.urls import path


def query(request):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s), pg_backend_pid()", [float(request.GET.get("s", "0.01"))])
        return HttpResponse(str(cursor.fetchone()[1]))


def health(request):
    return HttpResponse("ok")


urlpatterns = [path("query", query), path("health", health)]
