import email.utils
import time

from stages.captions.api_common import (
    Permanent,
    RateLimiter,
    RetryPolicy,
    Transient,
    http_error,
    parse_retry_after,
    short_text,
)


def test_retry_after_forms():
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    when = email.utils.formatdate(time.time() + 20, usegmt=True)
    assert 15 < parse_retry_after({"Retry-After": when}) <= 20
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None


def test_status_classes():
    for status in (408, 409, 429, 500, 502, 503, 504):
        assert isinstance(http_error(status, "", ""), Transient), status
    for status in (400, 401, 403, 404):
        assert isinstance(http_error(status, "", ""), Permanent), status
    e = http_error(400, "DataInspectionFailed", "Input data may contain inappropriate content.")
    assert str(e) == "http 400 DataInspectionFailed: Input data may contain inappropriate content."


def test_html_bodies_become_one_line():
    html = "<html><head><title>502 Bad Gateway</title><style>h1{}</style></head><body><h1>502 Bad Gateway</h1></body></html>"
    assert short_text(html) == "502 Bad Gateway 502 Bad Gateway"
    assert len(short_text("x" * 1000)) <= 303


def test_retry_policy_honours_retry_after_and_backs_off():
    policy = RetryPolicy(max_attempts=5, base=0.5, max_wait=4.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise Transient("http 429", "slow down", retry_after=2.5)
        if len(calls) == 2:
            raise Transient("http 500")
        if len(calls) == 3:
            raise Transient("http 429", retry_after=99)
        return "ok"

    r = policy.retrying()
    slept = []
    r.sleep = slept.append
    assert r(flaky) == "ok"
    assert slept[0] == 2.5                 # Retry-After replaces the backoff
    assert 0 <= slept[1] <= 1.0            # full jitter within base * 2^(n-1)
    assert slept[2] == 4.0                 # a server's Retry-After is capped at max_wait


def test_permanent_is_never_retried():
    calls = []

    def bad():
        calls.append(1)
        raise Permanent("http 400 InvalidParameter", "bad image")

    r = RetryPolicy(max_attempts=5).retrying()
    r.sleep = lambda s: None
    try:
        r(bad)
    except Permanent:
        pass
    assert len(calls) == 1


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_rpm_spaces_requests_evenly():
    c = FakeClock()
    lim = RateLimiter(rpm=120, clock=c, sleep=c.sleep)
    stamps = []
    for _ in range(10):
        lim.acquire()
        stamps.append(c.t)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert all(abs(g - 0.5) < 1e-9 for g in gaps)


def test_tpm_bucket_waits_and_settles():
    c = FakeClock()
    lim = RateLimiter(tpm=6000, clock=c, sleep=c.sleep)  # 100 tokens/s
    lim.acquire(3000)
    lim.acquire(3000)
    assert c.t == 0.0                      # the first minute's budget
    lim.acquire(1000)
    assert 9.9 <= c.t <= 11.0              # 1000 tokens at 100/s
    lim.settle(1000, 3000)                 # the server reported more than estimated
    t0 = c.t
    lim.acquire(100)
    assert c.t - t0 >= 20.0                # the 2000-token overrun is paid back first
