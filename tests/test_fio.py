"""fio's nbd engine (libnbd) against rblock serve, with data verification."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.conftest import make_image

MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(shutil.which("fio") is None,
                                reason="fio is needed (make test installs it)")


def fio(uri: str, workdir, *extra: str) -> dict:
    argv = ["fio", "--name=rblock", "--ioengine=nbd", f"--uri={uri}", "--rw=randrw",
            "--iodepth=16", "--size=64M", "--verify=crc32c", "--do_verify=1",
            "--verify_fatal=1", "--randrepeat=0", "--output-format=json", *extra]
    # cwd: fio leaves a *-verify.state file in the working directory
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=workdir)
    assert proc.returncode == 0, f"fio exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "verify" not in proc.stderr.lower(), proc.stderr
    out = proc.stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]  # the engine prints a line first
    assert job["error"] == 0, job
    # randrw writes about half of the 64 MiB; the verify pass reads back what was written
    assert job["write"]["io_bytes"] >= 16 * MiB, job["write"]
    assert job["read"]["io_bytes"] >= job["write"]["io_bytes"], job["read"]
    return job


@pytest.mark.parametrize("bs", [["--bs=4k"], ["--bsrange=512-256k"]], ids=["4k", "512-256k"])
def test_fio_randrw_verify(rblock_serve, tmp_path, bs):
    img = make_image(tmp_path / "fio.img", 64 * MiB)
    srv = rblock_serve(img, "--export", "fio")
    fio(srv.uri, tmp_path, *bs)
    assert srv.stop() == 0
    assert "WARNING" not in srv.log(), srv.log()
