"""The closure contract: named losses (dict), task-aware closures (``task=``), and the
errors for closures that break the contract or optimizers extended after construction."""

import pytest
import torch

from mtlsam_ext import MTLSAM
from tests.models import TwoTask

METHODS = [dict(method="gl"), dict(method="gl", local_grad="lagged"),
           dict(method="gl", local_grad="zo", n_dirs=1), dict(method="fmtl"),
           dict(method="sam"), dict(method="erm")]
IDS = ["gl", "gl-lagged", "gl-zo", "fmtl", "sam", "erm"]
NAMES = ["depth", "seg", "normal"]


def _opt(m, cfg, agg="mgda"):
    return MTLSAM(m.body, torch.optim.Adam, heads=list(m.heads), aggregator=agg, lr=1e-2,
                  backend="torch", generator=torch.Generator().manual_seed(0), **cfg)


def _named(m):
    return lambda: dict(zip(NAMES, m.losses()))


def _task_aware(m, calls, named=False):
    """Builds only the head (and loss) asked for; records each call's ``task``."""

    def closure(task=None):
        calls.append(task)
        h = m.body(m.x)
        if task is None:
            losses = [((hd(h).squeeze(1) - m.y[:, i]) ** 2).mean()
                      for i, hd in enumerate(m.heads)]
            return dict(zip(NAMES, losses)) if named else losses
        i = NAMES.index(task) if named else task
        loss = ((m.heads[i](h).squeeze(1) - m.y[:, i]) ** 2).mean()
        return {task: loss} if named else loss

    return closure


@pytest.mark.parametrize("cfg", METHODS, ids=IDS)
def test_named_losses_train_like_a_list(cfg):
    a, b = TwoTask(k=3), TwoTask(k=3)
    opt_a, opt_b = _opt(a, cfg), _opt(b, cfg)
    for _ in range(3):
        la = opt_a.step(a.losses)
        lb = opt_b.step(_named(b))
        assert isinstance(lb, dict) and list(lb) == NAMES
        assert torch.equal(la, torch.stack(list(lb.values())))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert opt_b.info()["task_names"] == NAMES
    assert opt_a.info()["task_names"] is None


def test_named_losses_fixed_by_the_first_step():
    m = TwoTask(k=3)
    opt = _opt(m, dict(method="gl"))
    opt.step(_named(m))
    # The same names in another order are taken in the fixed order.
    out = opt.step(lambda: dict(reversed(list(zip(NAMES, m.losses())))))
    assert list(out) == NAMES
    with pytest.raises(ValueError, match="the first step"):
        opt.step(lambda: dict(zip(["a", "b", "c"], m.losses())))
    with pytest.raises(ValueError, match="return a dict"):
        opt.step(m.losses)
    with pytest.raises(ValueError, match="task names"):
        opt.step(lambda: {1: m.losses()[0]})


def test_named_losses_survive_state_dict():
    m = TwoTask(k=3)
    opt = _opt(m, dict(method="gl", local_grad="lagged"))
    opt.step(_named(m))
    state = opt.state_dict()
    opt2 = _opt(TwoTask(k=3), dict(method="gl", local_grad="lagged"))
    opt2.load_state_dict(state)
    assert opt2.info()["task_names"] == NAMES
    m.losses()
    with pytest.raises(ValueError, match="return a dict"):
        opt2.step(m.losses)


def test_list_then_dict_is_an_error():
    m = TwoTask(k=3)
    opt = _opt(m, dict(method="fmtl"))
    opt.step(m.losses)
    with pytest.raises(ValueError, match="unnamed"):
        opt.step(_named(m))


@pytest.mark.parametrize("named", [False, True], ids=["indexed", "named"])
@pytest.mark.parametrize("cfg", METHODS, ids=IDS)
def test_task_aware_closure_equals_the_plain_one(cfg, named):
    """Perturbed passes call ``closure(task=i)`` (``i`` the name for named losses) and the
    step is bit for bit the one with a closure returning all K losses every time."""
    a, b = TwoTask(k=3), TwoTask(k=3)
    opt_a, opt_b = _opt(a, cfg), _opt(b, cfg)
    calls: list = []
    closure = _task_aware(b, calls, named)
    for _ in range(2):
        calls.clear()
        opt_a.step(a.losses)
        opt_b.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    tasks = NAMES if named else [0, 1, 2]
    expect = {"gl": [None] + tasks, "gl-lagged": [None] + tasks,
              "gl-zo": [None, None, None] + tasks, "fmtl": [None] + tasks,
              "sam": [None, None], "erm": [None]}[IDS[METHODS.index(cfg)]]
    assert calls == expect


def test_task_aware_closure_must_return_one_loss():
    m = TwoTask(k=2)
    opt = _opt(m, dict(method="fmtl"))
    with pytest.raises(ValueError, match=r"closure\(task=0\) must return one scalar loss"):
        opt.step(lambda task=None: m.losses())


def test_closure_calling_backward_gets_the_contract():
    m = TwoTask(k=2)
    opt = _opt(m, dict(method="gl"))

    def bad():
        losses = m.losses()
        sum(losses).backward()
        return losses

    before = m.snapshot()
    with pytest.raises(ValueError, match="without calling backward"):
        opt.step(bad)  # first step: the gradients changed inside the closure
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    opt.step(m.losses)
    with pytest.raises(ValueError, match="without calling backward"):
        opt.step(bad)  # later steps: autograd's "backward through the graph a second time"


def test_add_param_group_after_construction_is_refused():
    m = TwoTask(k=2)
    opt = _opt(m, dict(method="gl"))
    extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="parameter groups after construction"):
        opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 2
    opt.step(m.losses)


def test_task_keyword_found_through_wrappers():
    """Whether a closure is task-aware is read from its signature, also for wrappers that
    share one code object (functools.wraps) and for closures redefined every step."""
    import functools

    from mtlsam_ext.optim.closure import accepts_task

    def deco(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            return f(*args, **kwargs)
        return wrapper

    @deco
    def aware(task=None):
        return task

    @deco
    def plain():
        return None

    assert accepts_task(aware) and not accepts_task(plain)
    assert accepts_task(aware) and not accepts_task(plain)  # (answers cached by code)
    for _ in range(2):
        def again(task=None):
            return task
        assert accepts_task(again)


@pytest.mark.parametrize("cfg", METHODS, ids=IDS)
def test_heads_as_a_module_dict_name_the_tasks(cfg):
    """heads=nn.ModuleDict: its names are the task names, the closure's dict is matched to
    the heads by name (in any order), and the step equals the one with a list of heads."""
    m1, m2 = TwoTask(k=3), TwoTask(k=3)
    heads = torch.nn.ModuleDict(zip(NAMES, m2.heads))
    opt1 = _opt(m1, cfg)
    opt2 = MTLSAM(m2.body, torch.optim.Adam, heads=heads, aggregator="mgda", lr=1e-2,
                  backend="torch", generator=torch.Generator().manual_seed(0), **cfg)
    assert opt2.task_names == NAMES
    for _ in range(2):
        out1 = opt1.step(m1.losses)
        # reversed order: matched by name, not by position
        out2 = opt2.step(lambda: dict(reversed(list(zip(NAMES, m2.losses())))))
        assert list(out2) == NAMES
        torch.testing.assert_close(torch.stack(list(out2.values())), out1, rtol=0, atol=0)
    for a, b in zip(list(m1.body.parameters()) + list(m1.heads.parameters()),
                    list(m2.body.parameters()) + list(m2.heads.parameters())):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="return a dict"):
        opt2.step(m2.losses)  # a list: which loss belongs to which named head?


def test_heads_given_as_one_module_are_refused():
    m = TwoTask(k=2)
    with pytest.raises(ValueError, match="ModuleDict"):
        MTLSAM(m.body, torch.optim.SGD, heads=m.heads[0], lr=0.1)
    opt = MTLSAM(m.body, torch.optim.SGD, heads=m.heads, lr=0.1)  # an nn.ModuleList is K heads
    assert opt.num_tasks == 2
    opt = MTLSAM(m.body, torch.optim.SGD, heads=torch.nn.Sequential(*m.heads), lr=0.1)
    assert opt.num_tasks == 2
