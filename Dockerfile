FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so editing the code does not reinstall them.
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY . .

# The app code stays root-owned and read-only to the service user; only var/ (static
# files, uploaded documents) is written at run time.
RUN python manage.py collectstatic --noinput \
    && useradd --system --uid 1000 --home-dir /app rmassimo \
    && mkdir -p var/media \
    && chown -R rmassimo:rmassimo var

USER rmassimo
EXPOSE 8000

CMD ["sh", "-c", "python manage.py migrate --noinput && exec daphne -b 0.0.0.0 -p 8000 rmassimo_site.asgi:application"]
