"""Maps on one stream of a module's tuple output (OutputOf): recording, fitting, applying."""

import torch
from torch import nn

from act_core.applying import apply_act
from act_core.estimators import ModuleEstimator
from act_core.fitting import fit
from act_core.recording import ActivationRecorder, OutputOf
from act_core.trajectory import TrajectoryFit


class TwoStreams(nn.Module):
    """Returns (text, image) like a FLUX double block; both come from one input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.text, self.image = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.text(x[:, :3]), self.image(x[:, 3:])


def entries(block):
    return {
        "m.block:text": OutputOf(block, 0, 8),
        "m.block:image": OutputOf(block, 1, 8),
        "m.block:joint": OutputOf(block, (0, 1), 8),
    }


def test_streams_are_recorded_transported_and_restored():
    block = TwoStreams()
    x = torch.randn(4, 7, 8)
    with torch.no_grad():
        text, image = block(x)
        with ActivationRecorder(entries(block)) as recorder:
            block(x)
    torch.testing.assert_close(recorder.samples("m.block:text"), text.mean(1))
    torch.testing.assert_close(recorder.samples("m.block:joint"), torch.cat([text, image], 1).mean(1))

    source = [torch.randn(4, 7, 8) for _ in range(3)]
    target = [torch.randn(4, 7, 8) * 2 + 1 for _ in range(3)]
    only_image = {"m.block:image": entries(block)["m.block:image"]}
    act_map = fit(block, source, target, only_image, support="unbounded", apply_mode="per_element")
    handle = apply_act(only_image, act_map, strength=0.0)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(block(x), (text, image), strict=True))  # lambda 0: exact
        handle.set_strength(1.0)
        steered_text, steered_image = block(x)
    handle.remove()
    assert torch.equal(steered_text, text) and not torch.equal(steered_image, image)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(block(x), (text, image), strict=True))


def test_a_joint_stream_is_split_back_in_place_of_both_elements():
    block = TwoStreams()
    joint = {"m.block:joint": entries(block)["m.block:joint"]}
    session = TrajectoryFit(joint, ModuleEstimator("linear", "unbounded", "per_element"), num_pairs=4)
    source, target = torch.randn(4, 7, 8), torch.randn(4, 7, 8) * 2 + 1
    with session, torch.no_grad(), session.call(0.5, source=slice(4, 8), target=slice(0, 4)):
        steered_text, steered_image = block(torch.cat([target, source]))
    act_map = session.result()
    assert steered_text.shape == (8, 3, 8) and steered_image.shape == (8, 4, 8)
    # the source rows of the joint stream now carry the target rows' per-unit means
    joint_out = torch.cat([steered_text, steered_image], 1)
    torch.testing.assert_close(joint_out[4:].mean((0, 1)), joint_out[:4].mean((0, 1)), atol=1e-4, rtol=1e-4)
    assert act_map.buckets == (0.5,) and list(act_map.modules) == ["m.block:joint"]
