"""Two-tier cache-aside: local tier, Redis tier, serializers, keys."""
