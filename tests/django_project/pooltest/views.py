from django.db import connection
from django.http import HttpResponse

from .models import Item


def create(request, name):
    Item.objects.create(name=name)
    return HttpResponse("ok")


def create_then_fail(request, name):
    Item.objects.create(name=name)
    raise ValueError("rolled back under ATOMIC_REQUESTS")


def backend_pid(request):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return HttpResponse(str(cursor.fetchone()[0]))
