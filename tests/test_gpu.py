"""On CUDA: a BoxTeacher training step equals the same step on the CPU, a mixed-precision step
keeps its losses and pseudo labels in float32, the pairwise term matches the CPU. Skipped
without a CUDA device (``python tools/gpu_check.py`` runs them with the speed tables)."""

import pytest
import torch

from boxteacher.build import build_model
from boxteacher.modeling.pairwise import neighbour_offsets, pairwise_loss

from tiny_models import TINY_BOXTEACHER, tiny_cfg
from tiny_models import two_view_batch as batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def boxteacher_that_detects():
    """A tiny BoxTeacher whose teacher detects (every location a candidate, boxes of about
    16 px) and refines its masks, teacher = student."""
    torch.manual_seed(0)
    model = build_model(
        tiny_cfg(
            *TINY_BOXTEACHER,
            "MODEL.FCOS.INFERENCE_TH_TEST",
            "0.0",
            "MODEL.BOX_TEACHER.REFINE_RADIUS",
            "2",
        )
    )
    with torch.no_grad():
        model.teacher.proposal_generator.fcos_head.bbox_pred.bias.fill_(1.0)
    model.student.load_state_dict(model.teacher.state_dict())
    return model.train()


def losses_and_gradient_norm(model):
    losses = model(batch(), iteration=0)
    total = sum(v for k, v in losses.items() if k.startswith("loss"))
    model.zero_grad(set_to_none=True)
    total.backward()
    norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in model.student.parameters() if p.grad is not None])
    )
    return {k: v.detach().cpu() for k, v in losses.items()}, norm.cpu()


def test_a_boxteacher_step_on_cuda_equals_the_step_on_the_cpu():
    """float32 without TF32: losses within 1e-3 (relative), the same number of pseudo masks."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = boxteacher_that_detects()
    on_cpu, norm_cpu = losses_and_gradient_norm(model)
    on_cuda, norm_cuda = losses_and_gradient_norm(model.cuda())
    assert on_cuda["num_pseudo_masks"] == on_cpu["num_pseudo_masks"] > 0
    for name, value in on_cpu.items():
        torch.testing.assert_close(on_cuda[name], value, rtol=1e-3, atol=1e-4, msg=name)
    torch.testing.assert_close(norm_cuda, norm_cpu, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_mixed_precision_boxteacher_step_on_cuda(dtype):
    model = boxteacher_that_detects().cuda()
    full, _ = losses_and_gradient_norm(model)
    with torch.autocast("cuda", dtype=dtype):
        mixed = model(batch(), iteration=0)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in mixed.values())
    for name, value in full.items():
        torch.testing.assert_close(mixed[name].cpu(), value, rtol=0.1, atol=0.02, msg=name)


def test_the_pairwise_term_on_cuda_equals_the_cpu():
    g = torch.Generator().manual_seed(0)
    k, h, w = 16, 50, 84
    logits = torch.randn(k, 1, h, w, generator=g) * 3
    pair_weights = torch.rand(2, 8, h, w, generator=g) > 0.3
    pair_index = torch.randint(0, 2, (k,), generator=g)
    centre = (torch.rand(k, 1, h, w, generator=g) > 0.5).float()
    results = []
    for device in ("cpu", "cuda"):
        x = logits.to(device).requires_grad_()
        sums, weights = pairwise_loss(
            x,
            pair_weights.to(device),
            pair_index.to(device),
            centre.to(device),
            neighbour_offsets(3, 2),
        )
        sums.sum().backward()
        results.append((sums.detach().cpu(), weights.cpu(), x.grad.cpu()))
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-4)
