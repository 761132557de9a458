"""The jitted train and eval steps.

``make_train_step`` returns a pure ``(state, batch) -> (state, metrics)``:
forward in train mode, per-task losses over labelled rows, the loss weighting
(``mtop_jax.weighting``), one optax update. Loss-based methods combine the
losses inside the differentiated function (``uncertainty``'s log-variances are
differentiated with the model and updated by their own Adam); gradient-based
methods get the per-task gradients of every parameter from one forward and K
vector-Jacobian products batched with ``jax.vmap``, and combine them on the
shared parameters (the per-task ones take their own task's gradient). A step
whose loss or gradient is not finite is not applied and is counted in
``state.nonfinite_run``.

:func:`jit_train_step` and :func:`jit_eval_step` are the one place where these
are jitted (explicit shardings, the state donated): the trainer, ``mtop-jax
eval``, the benchmarks and the tests all take their steps from there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mtop_jax.models.axes import is_per_task
from mtop_jax.training.losses import task_losses
from mtop_jax.training.state import TrainState
from mtop_jax.weighting import GradWeighting, LossWeighting, combine_grad_tree, per_task_grads

BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "targets", "weights")


def shared_mask(params: nnx.State) -> nnx.State:
    """True for parameters shared by the tasks (no leading ``tasks`` axis)."""
    flat = nnx.to_flat_state(params)

    return nnx.from_flat_state([(p, v.replace(not is_per_task(v))) for p, v in flat])


def weighting_optimizer(learning_rate: float) -> optax.GradientTransformation:
    """For a weighting method's own learned parameters (uncertainty's log-variances)."""
    return optax.adam(learning_rate)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    weighting: LossWeighting | GradWeighting, regression,
                    weighting_tx: optax.GradientTransformation | None = None, *,
                    seed: int = 0, task_loss: str = "labelled", output_scales=None,
                    frozen: nnx.State | None = None):
    """The pure train step; ``seed`` (``train.seed``) keys a method's randomness
    (PCGrad's projection order), folded with the step number; ``task_loss``
    (``train.task_loss``) normalises each task's loss (``losses.task_losses``);
    ``output_scales``: the tasks' (target_mean [N], target_std [N])
    (``data.tasks.output_scales``), None for none; ``frozen``: True for the parameters
    the optimizer never changes (``optim.frozen_mask``): their gradient is not computed
    (``stop_gradient``: a one-task ``prompts`` step of MiniLM, B=32, L=128, went from
    246 to 86 G FLOPs, a full step being 285 G), None: every gradient."""
    regression = jnp.asarray(regression)
    mean, std = _scales(output_scales)
    weighting_tx = weighting_tx or weighting_optimizer(1e-2)
    base_key = jax.random.key(seed)

    def forward(params, rest, batch):
        """(losses [K], (present [K], counts [K], the model's new non-param state))."""
        if frozen is not None:  # their gradients are zeros XLA need not compute
            params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p,
                                  params, frozen)
        # Fresh Variables in this trace: dropout advances its RNG counter in place.
        model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
        logits = model.logits(batch["input_ids"], batch["attention_mask"],
                              batch["token_type_ids"])
        losses, present, counts = task_losses(logits, batch["labels"], batch["targets"],
                                              batch["weights"], regression, task_loss,
                                              mean, std)
        return losses, (present, counts, nnx.state(model, nnx.Not(nnx.Param)))

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        wstate, wparams, wopt = (state.weighting["state"], state.weighting["params"],
                                 state.weighting["opt"])
        if weighting.kind == "loss":

            def total_loss(params, wparams):
                losses, aux = forward(params, state.rest, batch)
                total, w_aux = weighting.combine(losses, aux[0], wstate, wparams)
                return total, (losses, aux, w_aux)

            (total, (losses, (present, counts, rest), w_aux)), (grads, wgrads) = (
                jax.value_and_grad(total_loss, argnums=(0, 1), has_aux=True)(
                    state.params, wparams))
        else:
            key = jax.random.fold_in(base_key, state.step)
            (losses, (present, counts, rest)), per_task = per_task_grads(
                lambda p, b: forward(p, state.rest, b), state.params, batch, len(regression),
                has_aux=True)
            grads, wstate, w_aux = combine_grad_tree(
                weighting, per_task, losses, present, wstate, key,
                shared=shared_mask(state.params))
            total, wgrads = jnp.sum(jnp.where(present, losses, 0.0)), {}

        finite = jnp.isfinite(total) & _all_finite(grads) & _all_finite(wgrads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        wupdates, wopt_new = weighting_tx.update(wgrads, wopt, wparams)
        wparams_new = optax.apply_updates(wparams, wupdates)
        if weighting.kind == "loss":
            if weighting.needs_losses_after_step:  # FAMO: the same batch, after the update
                new_losses, (new_present, _, _) = forward(params, state.rest, batch)
                wstate = weighting.update(wstate, losses, present, new_losses=new_losses,
                                          new_present=new_present)
            else:
                wstate = weighting.update(wstate, losses, present)

        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            rest=rest,
            opt_state=keep(opt_state, state.opt_state),
            weighting=keep({"state": wstate, "params": wparams_new, "opt": wopt_new},
                           state.weighting),
            nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1))
        metrics = {"loss": jnp.sum(jnp.where(present, losses, 0.0)), "objective": total,
                   "task_losses": losses, "present": present, "counts": counts,
                   "finite": finite, "nonfinite_run": new_state.nonfinite_run,
                   **{f"weighting/{k}": v for k, v in w_aux.items()}}
        return new_state, metrics

    return step


def _scales(output_scales) -> tuple[jax.Array, jax.Array]:
    """(target_mean, target_std) as arrays; None: 0 and 1 (raw units)."""
    mean, std = (0.0, 1.0) if output_scales is None else output_scales
    return jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)


def make_eval_step(graphdef: nnx.GraphDef, regression, output_scales=None):
    """(params, rest, batch) -> predictions [B, N] (class ids, or values for regression,
    in the targets' units), per-task loss sums (regression: standardised units, as in
    training) and label counts, and the batch's example ``index``."""
    regression = jnp.asarray(regression)
    mean, std = _scales(output_scales)

    def step(params: nnx.State, rest: nnx.State, batch: dict[str, jax.Array]) -> dict:
        model = nnx.merge(graphdef, params, rest)
        logits = model.logits(batch["input_ids"], batch["attention_mask"],
                              batch["token_type_ids"])
        losses, _, counts = task_losses(logits, batch["labels"], batch["targets"],
                                        batch["weights"], regression, "labelled", mean, std)
        predictions = jnp.where(regression[None], logits[..., 0] * std + mean,
                                jnp.argmax(logits, axis=-1).astype(jnp.float32))
        return {"predictions": predictions, "loss_sums": losses * counts, "counts": counts,
                "index": batch["index"]}

    return step


def jit_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                   weighting: LossWeighting | GradWeighting, regression,
                   weighting_tx: optax.GradientTransformation, *, seed: int,
                   state_shardings, data_sharding: NamedSharding, task_loss: str = "labelled",
                   output_scales=None, frozen: nnx.State | None = None):
    """``(state, batch) -> (state, metrics)`` jitted with the state's and the batch's
    shardings; the state is donated (updated in place)."""
    return jax.jit(make_train_step(graphdef, tx, weighting, regression, weighting_tx,
                                   seed=seed, task_loss=task_loss,
                                   output_scales=output_scales, frozen=frozen),
                   in_shardings=(state_shardings, data_sharding),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def jit_eval_step(graphdef: nnx.GraphDef, regression, *, param_shardings, rest_shardings,
                  data_sharding: NamedSharding, output_scales=None):
    """``(params, rest, batch) -> outputs`` jitted; outputs replicated on the mesh, so
    that every process reads the whole global batch."""
    return jax.jit(make_eval_step(graphdef, regression, output_scales),
                   in_shardings=(param_shardings, rest_shardings, data_sharding),
                   out_shardings=NamedSharding(data_sharding.mesh, PartitionSpec()))
