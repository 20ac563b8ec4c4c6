from django.db import models


class Item(models.Model):
    """Rows created by the harness (bench/run.py), not by migrations."""

    name = models.CharField(max_length=64)
    value = models.IntegerField()

    class Meta:
        managed = False
        db_table = "bench_item"
