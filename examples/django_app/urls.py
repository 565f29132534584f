"""URLs of the example project: ``/dim/`` shows what runs in the worker that answers."""

from django.urls import path
from feeds.views import where

urlpatterns = [path("dim/", where)]
