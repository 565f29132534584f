"""Django's management commands of dim's app (``manage.py dim``)."""
