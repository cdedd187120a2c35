"""`normalize` and `cleanup`: the canonicalizing passes around detection and rewriting."""
from __future__ import annotations

from lincompile.capture.normalize import eliminate_dead_code, normalize
from lincompile.passes.base import Pass, PassContext, register_pass


@register_pass
class Normalize(Pass):
    name = "normalize"
    description = ("drop runtime asserts, no-op casts/aliases and p=0 dropout, make in-place score arithmetic "
                   "out-of-place, write heads merged into the batch (Bloom) in 4-D, so patterns see one canonical "
                   "form")

    def run(self, ctx: PassContext) -> list[str]:
        return [f"removed or rewrote {normalize(ctx.gm)} identity and in-place nodes"]


@register_pass
class Cleanup(Pass):
    name = "cleanup"
    description = "remove nodes left dead by the rewrite (old attention cores, unused mask builders)"

    def run(self, ctx: PassContext) -> list[str]:
        removed = eliminate_dead_code(ctx.gm)
        ctx.gm.delete_all_unused_submodules()
        return [f"removed {removed} dead nodes"]
