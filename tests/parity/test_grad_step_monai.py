"""Two plain-Adam steps on our U-Net (optax) equal two torch Adam steps on MONAI's DynUNet.

Same weights (ported with nnunet_jax.interop.monai), same data. Loss in both frameworks: mean cross-entropy of
the logits over batch and voxels, computed here so the test does not depend on nnunet_jax.losses. After each
step:
- the loss: relative difference <= 1e-5;
- every gradient tensor: max |g_ours - g_torch| <= 1e-4 * max |g_torch| (per-tensor relative error);
- every parameter: Adam's first steps are ~ lr * sign(g), so a gradient entry below float32 rounding noise
  can take either sign. We require |p_ours - p_torch| <= 1e-3 * lr wherever |g_torch| > 1e-4 * max |g_torch|
  of its tensor in every step so far, and let the rest (reported, a handful at most) differ by <= 2 * lr
  per step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")

from nnunet_jax.interop.monai import params_to_torch_state_dict, torch_state_dict_to_variables  # noqa: E402
from nnunet_jax.models import UNet  # noqa: E402

pytestmark = pytest.mark.parity
LR = 1e-3
STEPS = 2


@pytest.mark.parametrize("residual", [False, True], ids=["basic", "residual"])
def test_adam_steps_match_torch(residual):
    kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    filters = [4, 8, 16]
    torch.manual_seed(0)
    net = monai_nets.DynUNet(3, 2, 3, kernels, strides, strides[1:], filters=filters, res_block=residual,
                             trans_bias=True)
    model = UNet(3, kernels, strides, filters=filters, residual=residual)
    params = torch_state_dict_to_variables(net.state_dict(), model)["params"]

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 2, 8, 16, 16)).astype(np.float32)
    y = rng.integers(0, 3, size=(2, 8, 16, 16))
    x_ours, y_ours = jnp.asarray(np.moveaxis(x, 1, -1)), jnp.asarray(y)
    x_torch, y_torch = torch.from_numpy(x), torch.from_numpy(y)

    def loss_fn(p):
        logits = model.apply({"params": p}, x_ours, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y_ours).mean()

    tx = optax.adam(LR, b1=0.9, b2=0.999, eps=1e-8)
    opt_state = tx.init(params)
    torch_opt = torch.optim.Adam(net.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    names = {id(p): n for n, p in net.named_parameters()}
    net.train()
    reliable: dict[str, np.ndarray] = {}
    for step in range(STEPS):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)

        torch_opt.zero_grad()
        torch_loss = torch.nn.functional.cross_entropy(net(x_torch), y_torch)
        torch_loss.backward()
        torch_grads = {names[id(p)]: p.grad.numpy().copy() for p in net.parameters()}
        torch_opt.step()

        assert abs(float(loss) - torch_loss.item()) <= 1e-5 * abs(torch_loss.item())
        ours_grads = params_to_torch_state_dict({"params": grads}, monai_aliases=False)
        assert set(ours_grads) == set(torch_grads)
        worst = max(np.abs(ours_grads[k] - g).max() / np.abs(g).max() for k, g in torch_grads.items())
        print(f"step {step}: loss {float(loss):.6f} vs {torch_loss.item():.6f}, gradient error {worst:.2e}")
        assert worst <= 1e-4

        ours_now = params_to_torch_state_dict({"params": params}, monai_aliases=False)
        flips, total, where = 0, 0, set()
        for name, p in net.named_parameters():
            g = torch_grads[name]
            ok = np.abs(g) > 1e-4 * np.abs(g).max()
            reliable[name] = reliable.get(name, ok) & ok
            diff = np.abs(ours_now[name] - p.detach().numpy())
            assert diff[reliable[name]].max(initial=0) <= 1e-3 * LR, name
            assert diff.max() <= 2 * LR * (step + 1), name
            flips += int((diff > 1e-3 * LR).sum())
            total += diff.size
            where |= {name} if (diff > 1e-3 * LR).any() else set()
        print(f"step {step}: {flips} of {total} parameters differ by more than 1e-3 * lr {sorted(where)}")
