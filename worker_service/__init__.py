"""Celery workers that run scans from RabbitMQ priority queues."""
