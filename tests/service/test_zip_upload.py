"""A zipped DICOM series upload is checked before anything in it is unpacked: member count, declared unpacked
size, member names (no absolute path, drive, ``..``, link or encrypted member). Through a real server:
tests/service/test_volume_service.py."""

from __future__ import annotations

import io
import zipfile

import pytest

httpx = pytest.importorskip("httpx")
from saliency_trust.serve import MAX_ZIP_MEMBERS, is_zip, zip_problem  # noqa: E402


def _zip(path, members: dict[str, bytes], *, link: str | None = None, level: int = zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", level) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = level
            if name == link:
                info.external_attr = (0o120777 << 16)  # a symbolic link, as zip -y stores one
            zf.writestr(info, data)
    return path


def _mark_encrypted(path) -> None:
    """Set the 'encrypted' bit of every member (local and central headers), as an encrypting zip tool does."""
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(signature)
        while at >= 0:
            data[at + offset] |= 0x1
            at = data.find(signature, at + 4)
    path.write_bytes(bytes(data))


def test_a_plain_series_zip_passes(tmp_path):
    path = _zip(tmp_path / "ok.zip", {"series/CT00001.dcm": b"x" * 100, "series/CT00002.dcm": b"y" * 100,
                                      "series/": b""})
    assert is_zip(path.read_bytes()[:4]) and zip_problem(path, max_unzipped=10_000) is None


@pytest.mark.parametrize(("name", "words"), [
    ("../../etc/cron.d/evil", "leaving the folder"),
    ("series/../../evil.dcm", "leaving the folder"),
    ("/etc/passwd", "an absolute path"),
    ("C:/Windows/evil.dcm", "an absolute path"),
    ("..\\..\\evil.dcm", "leaving the folder"),
])
def test_a_member_name_leaving_the_folder_is_refused(tmp_path, name, words):
    path = _zip(tmp_path / "bad.zip", {"CT00001.dcm": b"x", name: b"y"})
    problem = zip_problem(path, max_unzipped=10_000)
    assert problem is not None and words in problem and name[:20] in problem.replace("\\\\", "\\")


def test_a_link_an_encrypted_member_and_too_many_members_are_refused(tmp_path):
    link = _zip(tmp_path / "link.zip", {"CT00001.dcm": b"x", "CT00002.dcm": b"/etc/passwd"}, link="CT00002.dcm")
    assert "is a link" in zip_problem(link, max_unzipped=10_000)
    locked = _zip(tmp_path / "locked.zip", {"CT00001.dcm": b"x"})
    _mark_encrypted(locked)
    assert "is encrypted" in zip_problem(locked, max_unzipped=10_000)
    many = _zip(tmp_path / "many.zip", {f"{k}.dcm": b"" for k in range(MAX_ZIP_MEMBERS + 1)},
                level=zipfile.ZIP_STORED)
    assert f"{MAX_ZIP_MEMBERS + 1} entries, over the limit" in zip_problem(many, max_unzipped=10_000)
    assert "no file" in zip_problem(_zip(tmp_path / "empty.zip", {}), max_unzipped=10_000)
    (tmp_path / "cut.zip").write_bytes(link.read_bytes()[:40])
    assert "not a readable zip" in zip_problem(tmp_path / "cut.zip", max_unzipped=10_000)


def test_a_zip_bomb_is_refused_from_its_directory_before_anything_is_unpacked(tmp_path, monkeypatch):
    # 64 MiB of zeros deflate to about 64 KiB: refused by the declared size, and never read.
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("CT00001.dcm", "w") as f:
        for _ in range(64):
            f.write(bytes(2**20))
    assert bomb.stat().st_size < 2**20
    opened = []
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: opened.append(a) or io.BytesIO(b""))
    problem = zip_problem(bomb, max_unzipped=32 * 2**20)
    assert problem == "the zip unpacks to 64 MiB, over the limit of 32 MiB for one series" and opened == []
