"""``/admin/stats``' CPU ``total_bytes`` is a container's memory limit where it is lower than the machine's RAM.

A JupyterHub user's server often runs in a pod limited to a few GiB on a node with hundreds: the panel's gauge
compared the models' memory with the node's RAM, showing room the pod does not have (it is killed past its limit).
"""

from __future__ import annotations

import os

from xllm_jupyter.server import stats


def test_cpu_total_is_the_containers_limit_when_lower(tmp_path, monkeypatch):
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    monkeypatch.setattr(stats, "CGROUP_MEMORY_LIMITS", (str(v2), str(v1)))
    assert stats.memory_view([], {})["cpu"]["total_bytes"] == physical  # no cgroup files: the machine's

    v2.write_text(f"{2 * 1024 ** 3}\n")  # cgroup v2, a 2 GiB pod
    assert stats.memory_view([], {})["cpu"]["total_bytes"] == min(physical, 2 * 1024 ** 3)
    v2.write_text("max\n")  # v2 without a limit
    assert stats.memory_view([], {})["cpu"]["total_bytes"] == physical

    v2.unlink()
    v1.write_text(f"{1024 ** 3}\n")  # cgroup v1
    assert stats.memory_view([], {})["cpu"]["total_bytes"] == min(physical, 1024 ** 3)
    v1.write_text("9223372036854771712\n")  # v1's "no limit"
    assert stats.memory_view([], {})["cpu"]["total_bytes"] == physical
