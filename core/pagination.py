from django.conf import settings
from rest_framework import pagination


class LimitOffsetPagination(pagination.LimitOffsetPagination):
    """DRF's, with a largest page: `?limit=` asks for at most RMASSIMO_MAX_PAGE_SIZE rows."""

    @property
    def max_limit(self) -> int:
        return settings.RMASSIMO_MAX_PAGE_SIZE
