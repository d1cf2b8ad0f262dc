"""Render a policy's transition table as a Mermaid state diagram for the docs."""

from __future__ import annotations

from collections import defaultdict

from resilience.breaker.policy import OPERATOR_TRIGGERS, TRANSITIONS


def breaker_mermaid() -> str:
    """The breaker's state diagram; operator triggers are grouped, since they apply anywhere."""
    operator = OPERATOR_TRIGGERS
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for (old, trigger), new in TRANSITIONS.items():
        if trigger not in operator:
            edges[(old.value, new.value)].append(trigger.value)
    lines = ["stateDiagram-v2", "    [*] --> closed"]
    for (src, dst), triggers in sorted(edges.items()):
        lines.append(f"    {src} --> {dst}: {' / '.join(sorted(triggers))}")
    ops = ", ".join(sorted(t.value for t in operator))
    lines.append(f"    note right of closed: operator triggers from any state: {ops}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(breaker_mermaid())
