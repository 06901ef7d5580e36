"""Message templates: Jinja2's sandbox, strict about undefined names so mistakes fail at load."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError, meta, nodes
from jinja2.sandbox import SandboxedEnvironment

from scrm.acquisition import links
from scrm.loyalty.recommend import recommend

_env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)
#: ``{{ recommend(customer, 3) }}``: the customer's pre-computed co-purchase recommendations.
_env.globals["recommend"] = recommend
#: ``{{ track('https://…') }}``: a tracked short link to the URL (scrm.acquisition.links).
_env.globals["track"] = links.track

#: Names a template may use, with sample values used to check templates at load time.
SAMPLE_CONTEXT: dict[str, Any] = {
    "customer": {"id": 1, "name": "顾客", "stage": "acquisition", "tags": ["奶粉"], "channel": "console",
                 "recommendations": [{"sku": "S1", "name": "奶瓶"}]},
    "coupon": {"code": "WEL23456789", "value": 10, "expires": "2026-12-31"},
    "campaign": {"name": "welcome", "title": "Welcome"},
    "group": {"id": 1, "title": "宝妈交流群", "channel": "wecom"},
}


def check(source: str, available: set[str]) -> str | None:
    """The problem with a template, or None. ``available`` names the variables it may use."""
    try:
        parsed = _env.parse(source)
        unknown = meta.find_undeclared_variables(parsed) - available - set(_env.globals)
        if unknown:
            return f"unknown variable(s): {', '.join(sorted(unknown))} (available: {', '.join(sorted(available))})"
        if problem := links.call_problem(parsed):
            return f"template error: {problem}"
        _env.from_string(source).render({k: v for k, v in SAMPLE_CONTEXT.items() if k in available})
    except TemplateError as exc:
        return f"template error: {exc}"
    return None


def attributes(source: str, name: str) -> frozenset[str] | None:
    """The attributes a (valid) template reads of variable ``name`` (``{{ customer.name }}``: name), or
    None when it uses the variable whole (prints it, hands it to a function such as ``recommend``):
    then any may be read. A caller fetches only what its templates show."""
    used: set[str] = set()

    def whole(node: nodes.Node, parent: nodes.Node | None) -> bool:
        if isinstance(node, nodes.Name) and node.name == name:
            if isinstance(parent, nodes.Getattr) and parent.node is node:
                used.add(parent.attr)
            elif (isinstance(parent, nodes.Getitem) and parent.node is node and isinstance(parent.arg, nodes.Const)
                  and isinstance(parent.arg.value, str)):
                used.add(parent.arg.value)
            else:
                return True
        return any(whole(child, node) for child in node.iter_child_nodes())

    return None if whole(_env.parse(source), None) else frozenset(used)


def render(source: str, context: dict[str, Any]) -> str:
    return _compiled(source).render(context)


@lru_cache(maxsize=512)
def _compiled(source: str) -> Template:
    """A campaign renders the same few sources for every recipient; compiling one costs more than
    rendering it (``from_string`` does not cache)."""
    return _env.from_string(source)
