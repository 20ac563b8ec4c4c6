"""Three views that use the database the way a site does: a read, a write in a transaction, a slow query.

The table is created by run_demo.py (``demo_item``: id, name, hits).
"""
import os
import random

from django.db import connection, transaction
from django.http import HttpResponse, JsonResponse


def health(request):
    return HttpResponse("ok")


def read(request):
    with connection.cursor() as cur:
        cur.execute("SELECT id, name, hits FROM demo_item WHERE id = %s", [random.randint(1, 100)])
        row = cur.fetchone()
    return JsonResponse({"item": row, "pid": os.getpid()})


def write(request):
    item = random.randint(1, 100)
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute("SELECT hits FROM demo_item WHERE id = %s FOR UPDATE", [item])
            hits = cur.fetchone()[0]
            cur.execute("UPDATE demo_item SET hits = %s WHERE id = %s", [hits + 1, item])
    return JsonResponse({"item": item, "hits": hits + 1})


def slow(request):
    with connection.cursor() as cur:
        cur.execute("SELECT pg_sleep(0.05), count(*) FROM demo_item")
        count = cur.fetchone()[1]
    return JsonResponse({"items": count})
