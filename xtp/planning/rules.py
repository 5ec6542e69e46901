"""User rules: ``{glob over module paths: role}`` overrides of the derived plan.

A module a rule matches (or whose row/column partner a rule matches) is not sharded; its
reason names the rule. The only role a rule may give today is ``"replicate"``.
"""

from __future__ import annotations

import fnmatch

from ..errors import RuleError
from .render import collapse
from .spec import Role

#: roles a rule may give
RULE_ROLES = (Role.REPLICATE,)


def glob_rules(rules: dict[str, str] | None, names: list[str]) -> dict[str, tuple[Role, str]]:
    """module name -> (role, pattern) for every rule; validates roles and matches.

    Raises:
        RuleError: a rule names a role outside :data:`RULE_ROLES`, or matches no module (the
            message lists module paths to pattern on).
    """
    out: dict[str, tuple[Role, str]] = {}
    for pattern, role in (rules or {}).items():
        if role not in RULE_ROLES:
            raise RuleError(
                f"rule {pattern!r}: unknown role {role!r}; valid roles: {', '.join(RULE_ROLES)}"
            )
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            near = sorted({collapse(n) for n in names})[:8]
            raise RuleError(
                f"rule {pattern!r} matches no module; patterns are globs over module paths, "
                f"for example: {', '.join(near)}"
            )
        for n in hits:
            out[n] = (Role(role), pattern)
    return out
