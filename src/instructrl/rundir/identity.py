"""Whether a folder's run was begun with this config: its identity (the config sections it depends on)
compared with the one recorded, across versions of instructrl that moved, added or dropped keys."""

from __future__ import annotations

import copy

from instructrl.config import MOVED_KEYS


def with_moved_keys(saved: dict) -> dict:
    """An identity recorded before a key moved to another section (``MOVED_KEYS``), with the key where it is
    now: in its new section where the identity holds that section (collect's, rm's and ppo's hold collect),
    else left out, as a key no longer part of the identity."""
    saved = copy.deepcopy(saved)
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        if isinstance(saved.get(old_section), dict) and old_key in saved[old_section]:
            value = saved[old_section].pop(old_key)
            if isinstance(saved.get(new_section), dict):
                saved[new_section].setdefault(new_key, value)
    return saved


def comparable(current: dict, saved: dict, defaults: dict) -> tuple[dict, dict]:
    """``current`` and ``saved`` identities reduced to what both versions of instructrl know: a
    key only ``saved`` has is one no longer part of an identity, and a key only ``current`` has
    counts once it is off its default (an option added since leaves finished runs finished)."""
    now, then = {}, {}
    for key in current:  # in its order, which a message listing the changed keys keeps
        if key not in saved and current[key] == defaults.get(key, object()):
            continue
        a, b = current[key], saved.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            a, b = comparable(a, b, defaults.get(key) if isinstance(defaults.get(key), dict) else {})
        now[key], then[key] = a, b
    return now, then


def diff(old: dict, new: dict, prefix: str = "") -> str:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = diff(a, b, f"{prefix}{key}.")
            if inner:
                changes.append(inner)
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return ", ".join(changes)
