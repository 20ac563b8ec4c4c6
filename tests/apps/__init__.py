"""Small WSGI apps and load helpers for the server integration tests (gunicorn, uWSGI)."""
