#!/usr/bin/env python
"""Django's command-line utility for the example project.

Management commands never start dim (they serve no request; see settings.DIM)::

    python manage.py check
    python manage.py runserver --noreload   # dim starts at the first request
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
