"""The workers live in Redis (workers.health), not in the database. This model has no
table: it gives the admin and the API a permission to ask for before showing a worker's
host, process, job arguments, errors and Ollama address."""

from django.db import models

VIEW_PERMISSION = "workers.view_worker"


def may_see_details(user) -> bool:
    """Whether `user` may see where the workers run: hosts, Ollama URLs, job arguments."""
    return bool(user is not None and user.is_staff and user.has_perm(VIEW_PERMISSION))


class Worker(models.Model):
    class Meta:
        managed = False
        default_permissions = ("view",)
        verbose_name = "GPU worker"

    def __str__(self) -> str:
        return f"GPU worker {self.pk}"
