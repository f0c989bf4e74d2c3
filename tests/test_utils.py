"""The shared chores: the one atomic writer and the one argument validator."""
import json
import os
import stat

import pytest

from parclip.utils.checks import check_fraction, check_int, check_number, check_unit
from parclip.utils.files import atomic_open, atomic_write, write_json


def test_atomic_write_replaces_only_on_success(tmp_path):
    path = tmp_path / "sub" / "f.json"
    write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}

    def half_then_crash(tmp):
        with open(tmp, "w") as f:
            f.write('{"a": ')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, half_then_crash)
    assert json.loads(path.read_text()) == {"a": 1}  # the old file is intact
    with pytest.raises(ValueError):
        with atomic_open(path) as f:
            f.write("partial")
            raise ValueError
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]  # no temporary file left behind


def test_atomic_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {})
        plain = tmp_path / "b.json"
        plain.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644


def test_checks_name_owner_range_and_refuse_bools():
    assert check_int("k", 3, 2, 5) == 3 and check_number("lr", 1, 0) == 1.0 and check_unit("a", 0.5) == 0.5
    with pytest.raises(ValueError, match=r"^badnet: patch_size must be an int in \[1, 31\] for S=32, got 40$"):
        check_int("patch_size", 40, 1, 31, owner="badnet", context=" for S=32")
    with pytest.raises(ValueError, match=r"^steps must be an int >= 1, got True$"):
        check_int("steps", True, 1)
    with pytest.raises(ValueError, match="a number"):
        check_number("lr", float("nan"))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        check_unit("alpha", 1.5, owner="blended")
    with pytest.raises(TypeError):
        check_int("seed", 1.0, error=TypeError)

    class Custom(ValueError):
        pass

    with pytest.raises(Custom, match="max_bad_fraction"):
        check_fraction("max_bad_fraction", 2, error=Custom)
