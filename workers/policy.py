"""The placement policy: which chat model a GPU worker should serve, from what it sees.

Pure and deterministic, so that the workers, the tests and the benchmark's offline model
of it run the very same rules. docs/fleet.md explains them with the figures measured.

A worker serves one chat model at a time: it consumes that model's question queue. A
model swap costs the card a load (seconds to minutes), so a worker

1. starts with the model that most needs a server (waiting work and nobody serving it,
   then the largest shortfall of servers against its arrivals, then one already loaded);
2. gives a model with waiting work and no server at all a worker, if its own model keeps
   another server or has nothing waiting ("every model with waiting work gets a worker");
3. keeps its model while questions for it wait;
4. otherwise leaves only if the workers that stay can carry its model's arrivals, and only
   for a model whose need is worth the load: arrivals beyond what its servers can carry,
   or a backlog that would take its servers (with this one) longer to clear than the
   load costs. A model already resident on the card costs nothing to take.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Params:
    # Share of a card's time a model's servers may be kept busy by its arrivals before
    # it counts as short of servers (an M/G/c queue grows fast past ~90%).
    utilisation: float = 0.9
    # A backlog must take this many loads' time to clear before a worker swaps for it
    # while its own model still has arrivals: a swap there is likely to be undone later.
    backlog_loads: float = 2.0


@dataclass
class View:
    """What one worker sees at one moment (seconds are wall-clock seconds)."""

    serving: str | None  # the model it serves now
    pulled: set[str]  # chat models its Ollama has
    resident: set[str] = field(default_factory=set)  # loaded on its Ollama now
    busy: bool = False  # running a job now
    waiting: dict[str, int] = field(default_factory=dict)  # questions queued, per model
    servers: dict[str, int] = field(default_factory=dict)  # OTHER workers serving each model
    idle_servers: dict[str, int] = field(default_factory=dict)  # of those, idle now
    rate: dict[str, float] = field(default_factory=dict)  # arrivals per second, per model
    service_s: dict[str, float] = field(default_factory=dict)  # mean answer time, per model
    load_s: dict[str, float] = field(default_factory=dict)  # time to load, per model
    default_service_s: float = 5.0
    default_load_s: float = 10.0

    def service(self, model: str) -> float:
        return self.service_s.get(model) or self.default_service_s

    def cost(self, model: str) -> float:
        """What taking `model` costs this card: nothing if it is resident here."""
        if model in self.resident:
            return 0.0
        return self.load_s.get(model) or self.default_load_s

    def need(self, model: str) -> float:
        """Cards' worth of work arriving for `model` (arrival rate × answer time)."""
        return self.rate.get(model, 0.0) * self.service(model)


def choose(view: View, params: Params = Params()) -> str | None:  # noqa: B008 - frozen
    """The model this worker should serve now (its current one to stay)."""
    models = sorted(view.pulled)
    if not models:
        return None
    waiting = view.waiting
    servers = view.servers
    current = view.serving if view.serving in view.pulled else None
    if current is None:
        return max(
            models,
            key=lambda m: (
                waiting.get(m, 0) > 0 and servers.get(m, 0) == 0,
                view.need(m) - servers.get(m, 0),
                m in view.resident,
                waiting.get(m, 0),
            ),
        )

    orphans = [m for m in models if m != current and waiting.get(m, 0) and not servers.get(m)]
    if orphans and (servers.get(current, 0) >= 1 or not waiting.get(current, 0)):
        # A busy worker leaves the orphan to an idle one that can take it just as well.
        if not (view.busy and _someone_idle_could(view, orphans)):
            return max(orphans, key=lambda m: (waiting[m], -view.cost(m)))
    if waiting.get(current, 0):
        return current

    stay = servers.get(current, 0)
    still_carried = stay * params.utilisation >= view.need(current)
    # A swap must gain more than it costs, even for a model short of servers: the margin
    # keeps a worker from swapping on the first question of a turning mix.
    best, best_gain = current, 0.0
    for model in models:
        if model == current:
            continue
        capacity = servers.get(model, 0) * params.utilisation
        shortfall = view.need(model) - capacity
        backlog_s = waiting.get(model, 0) * view.service(model) / (servers.get(model, 0) + 1)
        cost = view.cost(model)
        if still_carried:
            worth = shortfall > 0 or backlog_s > cost
        else:
            # Leaving strands this model's arrivals: only for a backlog far beyond a load,
            # and never as its last server.
            worth = stay >= 1 and backlog_s > params.backlog_loads * max(cost, 1e-9)
        gain = max(shortfall, 0.0) * view.service(model) + backlog_s - cost
        if worth and gain > best_gain:
            best, best_gain = model, gain
    return best


def _someone_idle_could(view: View, models: list[str]) -> bool:
    return sum(view.idle_servers.values()) > 0
