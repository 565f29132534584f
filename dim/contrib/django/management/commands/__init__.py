"""``manage.py dim``: see :mod:`dim.contrib.django.management.commands.dim`."""
