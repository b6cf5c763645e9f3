"""No single point of failure for the mesh (issue 17, item 4), with real node processes: a
second admin, made with `allerac mesh admin add`, invites and revokes after the first
admin box is gone for good (killed, its data dir deleted)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.nodeproc import NodeProcess, run_cli
from tests.test_lan_mesh import peer_states, start_mesh, wait_until


def up_peers(node: NodeProcess) -> set[str]:
    return {node_id for node_id, state in peer_states(node).items() if state == "up"}


def mesh_info(node: NodeProcess) -> dict[str, object]:
    result = run_cli(node.home, "mesh", "members", "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_a_second_admin_invites_and_revokes_after_the_first_is_gone(tmp_path: Path) -> None:
    nodes = start_mesh(tmp_path, {"first": "", "second": "", "member": ""})
    first, second, member = nodes["first"], nodes["second"], nodes["member"]
    try:
        refused = run_cli(member.home, "mesh", "admin", "add", second.node_id)
        assert refused.returncode == 1
        assert "403" in refused.stderr  # only an admin makes admins
        made = run_cli(first.home, "mesh", "admin", "add", second.node_id)
        assert made.returncode == 0, made.stderr
        assert second.node_id in made.stdout
        listed = mesh_info(second)["members"]
        assert isinstance(listed, list)
        roles = {m["node_id"]: m["role"] for m in listed}
        assert roles[second.node_id] == "admin"
        assert member.node_id in roles  # it learnt the first admin's members

        first.kill()  # the first admin box is gone for good
        shutil.rmtree(first.home)

        newcomer = NodeProcess(tmp_path / "newcomer", "--peer", second.info["grpc_address"]).start()
        nodes["newcomer"] = newcomer
        code = run_cli(second.home, "mesh", "invite")
        assert code.returncode == 0, code.stderr
        joined = run_cli(newcomer.home, "mesh", "join", code.stdout.strip())
        assert joined.returncode == 0, joined.stderr
        assert first.info["mesh_id"] in joined.stdout
        # The member the first admin made and the one the second made accept each other.
        wait_until(
            lambda: (
                {second.node_id, member.node_id} <= up_peers(newcomer)
                and newcomer.node_id in up_peers(member)
            ),
            15,
            "the newcomer and the old member use each other",
        )

        revoked = run_cli(second.home, "mesh", "revoke", member.node_id)
        assert revoked.returncode == 0, revoked.stderr
        wait_until(
            lambda: (
                member.node_id not in up_peers(newcomer) and member.node_id not in up_peers(second)
            ),
            10,
            "the revoked member is dropped",
        )
    finally:
        for node in nodes.values():
            node.kill()
