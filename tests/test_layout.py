import resilience.integrations


def test_integrations_importable() -> None:
    assert resilience.integrations.__name__ == "resilience.integrations"
