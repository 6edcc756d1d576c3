"""The edge checks (runtime/gateway/validate.py) on any body a client can send: a request
is refused exactly when a standard field is missing, of the wrong type or out of range,
and the refusal names one of those fields."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.gateway.validate import WIRES, check
from runtime.providers import RequestError

JSON_TYPES = {"number": (int, float), "integer": (int,), "boolean": (bool,), "string": (str,),
              "array": (list,), "object": (dict,)}
values = st.one_of(
    st.none(), st.booleans(), st.integers(-300, 300),
    st.floats(-5, 5, allow_nan=False), st.text(max_size=3),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(),
                                                         max_size=2))


def wrong(wire: str, name: str, body: dict[str, Any]) -> bool:
    """Whether ``name`` is a reason to refuse ``body``, read from the wire's table."""
    spec = WIRES[wire].get(name)
    if spec is None:
        return False  # not a standard field: the provider's to judge
    value = body.get(name)
    if value is None:
        return spec.required
    kind_ok = any(isinstance(value, JSON_TYPES[k]) and not (
        isinstance(value, bool) and k in ("number", "integer")) for k in spec.kinds)
    if not kind_ok:
        return True
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return (spec.low is not None and value < spec.low) or (
        spec.high is not None and value > spec.high)


@given(wire=st.sampled_from(sorted(WIRES)), data=st.data())
def test_a_body_is_refused_exactly_when_a_standard_field_is_wrong(wire: str,
                                                                   data: Any) -> None:
    names = [*WIRES[wire], "not_a_standard_field"]
    body = data.draw(st.dictionaries(st.sampled_from(names), values, max_size=8))
    bad = [n for n in names if wrong(wire, n, body)]
    if not bad:
        check(wire, body)
        return
    with pytest.raises(RequestError) as refused:
        check(wire, body)
    assert refused.value.status == 400
    assert refused.value.param in bad
    assert refused.value.param in str(refused.value)


def test_the_wording_is_the_providers() -> None:
    with pytest.raises(RequestError, match=r"^Invalid type for 'temperature': expected a "
                       r"decimal, but got a string instead\.$"):
        check("chat", {"model": "m", "messages": [], "temperature": "hot"})
    with pytest.raises(RequestError, match=r"^Invalid 'max_tokens': integer below minimum "
                       r"value\. Expected a value >= 1, but got -5 instead\.$"):
        check("chat", {"model": "m", "messages": [], "max_tokens": -5})
    with pytest.raises(RequestError, match=r"^max_tokens: Field required$"):
        check("messages", {"model": "m", "messages": []})
    with pytest.raises(RequestError, match=r"^temperature: Input should be less than or "
                       r"equal to 1$"):
        check("messages", {"model": "m", "messages": [], "max_tokens": 5, "temperature": 1.5})
