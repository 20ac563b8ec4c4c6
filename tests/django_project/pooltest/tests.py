"""Django tests run by ``manage.py test`` in tests/test_django_engine.py (not by pytest)."""
from django.db import connection, transaction
from django.test import TestCase, TransactionTestCase

from .models import Item


class PooledTestCase(TestCase):
    def test_engine_and_database(self):
        self.assertEqual(connection.vendor, "postgresql")
        self.assertTrue(connection.settings_dict["NAME"].startswith("test_"))
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_database(), current_setting('application_name')")
            database, application = cursor.fetchone()
        self.assertEqual(database, connection.settings_dict["NAME"])
        self.assertTrue(application.startswith("sharedpool/"))

    def test_orm(self):
        Item.objects.bulk_create(Item(name=f"i{i}", n=i) for i in range(5))
        self.assertEqual(sorted(Item.objects.values_list("n", flat=True)), [0, 1, 2, 3, 4])
        self.assertEqual([i.n for i in Item.objects.order_by("n").iterator(chunk_size=2)], [0, 1, 2, 3, 4])

    def test_select_for_update(self):
        item = Item.objects.create(name="locked")
        with transaction.atomic():
            self.assertEqual(Item.objects.select_for_update().get(pk=item.pk).name, "locked")


class PooledTransactionTestCase(TransactionTestCase):
    def test_on_commit(self):
        ran = []
        with transaction.atomic():
            Item.objects.create(name="x")
            transaction.on_commit(lambda: ran.append(Item.objects.count()))
        self.assertEqual(ran, [1])

    def test_reconnect_reuses_backend(self):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
        connection.close()
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            self.assertEqual(cursor.fetchone()[0], pid)
