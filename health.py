"""Training health: a diverging loss stops the run before its step, and a layer (or the output) that is
silent, practically silent or saturated for --dead-patience mini-batches is reported (docs/training-health.md)."""
import math
import sys

from checkpoints import NonFiniteError, diverged, log


LOUDER = "more time steps (--time-steps), a lower learning rate (--lr), or a larger init scale"


class DeadLayerError(Exception):
    """--stop-on-dead: a layer has been (practically) silent or saturated for --dead-patience mini-batches."""


# Below these a layer, or the output, is practically silent: it passes almost nothing forward and almost
# no gradient back. Healthy networks' quietest layers fire 4× more or above (docs/training-health.md)
QUIET_RATE = 1e-3     # spikes per neuron per time step
QUIET_OUTPUT = 1e-3   # mean |output|: the loss then stays within 0.2 % of its all-zero value, 1 per image


class HealthMonitor:
    """Catches a layer that is silent (rate below QUIET_RATE, 0 included) or saturated (rate 1), or outputs
    that stay at their silent value 0 (mean |output| below QUIET_OUTPUT), batch after batch.

    A silent layer passes no input forward and no gradient back (∂o/∂U' is zero where no spike
    fired), so once it has lasted a few mini-batches it almost never ends by itself."""

    def __init__(self, args):
        self.args, self.streak, self.reported = args, {}, set()

    def check_loss(self, loss, epoch, batch):
        """A NaN or inf training loss stops the run (NonFiniteError) before its step. Left to run, every
        weight turns NaN, no neuron fires again, and the layers would look silent for the wrong reason."""
        if not math.isfinite(loss):
            raise NonFiniteError(diverged(f"the training loss is {loss} in epoch {epoch + 1}, batch {batch}",
                                          self.args))

    def check(self, rates, epoch, batch):
        """rates: layer -> firing rate in this batch; 'output' -> mean |output| over images and classes."""
        for name, rate in rates.items():
            dead = rate < (QUIET_OUTPUT if name == "output" else QUIET_RATE) or (rate == 1.0 and name != "output")
            self.streak[name] = self.streak.get(name, 0) + 1 if dead else 0
        due = [n for n in rates if self.streak[n] >= self.args.dead_patience and n not in self.reported]
        if not due:
            return
        self.reported.update(due)
        first, rate = due[0], rates[due[0]]
        if first == "output":
            what, remedy = ("the output layer has been silent (all outputs exactly 0)" if rate == 0 else
                            f"the outputs have stayed at their silent value 0 (mean |output| below "
                            f"{QUIET_OUTPUT:g}; the loss stays near 1 per image)"), LOUDER
        elif rate == 1.0:
            what, remedy = f"layer {first} has been saturated (a spike at every step)", \
                "a lower learning rate (--lr) or a smaller init scale"
        elif rate == 0:
            what, remedy = f"layer {first} has been silent (no spike)", LOUDER
        else:
            what, remedy = f"layer {first} has been practically silent (below {QUIET_RATE:g} spikes per " \
                "neuron per step)", LOUDER
        shown = f"{rate:.3f}" if rate == 0 or rate >= 0.001 else f"{rate:.1e}"
        also = f"; likewise {', '.join(due[1:])}" if len(due) > 1 else ""
        message = (f"{what} for {self.args.dead_patience} consecutive mini-batches (rate {shown}, epoch "
                   f"{epoch + 1}, batch {batch}){also}. It cannot learn like this; what usually helps: {remedy}")
        if self.args.stop_on_dead:
            raise DeadLayerError(f"{message} (--stop-on-dead)")
        log(self.args, f"WARNING: {message}", file=sys.stderr)
