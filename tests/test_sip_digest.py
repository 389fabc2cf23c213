"""Digest authentication: the RFC 7616 vectors through answer(), and every Verdict reached through
Challenger.verify() with credentials made by answer(): a round trip, replays, stale and forged nonces, a wrong
password, bad headers."""
from __future__ import annotations

import pytest

from services.sip import digest
from services.sip.digest import Challenger, Verdict

NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
OPAQUE = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"


def rfc7616(algorithm: str) -> str:
    return (f'Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm={algorithm}, nonce="{NONCE}", '
            f'opaque="{OPAQUE}"')


@pytest.mark.parametrize(("algorithm", "response"), [
    ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
])
def test_rfc7616_section_3_9_1_vectors(algorithm, response):
    value = digest.answer(rfc7616(algorithm), method="GET", uri="/dir/index.html", user="Mufasa",
                          password="Circle of Life", cnonce=CNONCE)
    scheme, params = digest.parse_params(value)
    assert scheme == "Digest"
    assert params == {"username": "Mufasa", "realm": "http-auth@example.org", "uri": "/dir/index.html",
                      "algorithm": algorithm, "nonce": NONCE, "nc": "00000001", "cnonce": CNONCE, "qop": "auth",
                      "response": response, "opaque": OPAQUE}


def test_answer_without_qop_is_rfc_2069():
    # RFC 2069 section 2.4's example, with its erratum's response
    challenge = 'Digest realm="testrealm@host.com", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093"'
    value = digest.answer(challenge, method="GET", uri="/dir/index.html", user="Mufasa", password="CircleOfLife")
    _, params = digest.parse_params(value)
    assert "qop" not in params and "nc" not in params and "algorithm" not in params
    assert params["response"] == "1949323746fe6a43ef61f9606e7febea"


@pytest.mark.parametrize(("challenge", "message"), [
    ('Basic realm="r"', "challenge scheme 'Basic' is not Digest"),
    ('Digest realm="r", nonce="n", algorithm=MD5-sess',
     "cannot answer the challenge: algorithm MD5-SESS is not spoken (MD5, SHA-256; no -sess variants)"),
    ('Digest realm="r", nonce="n", qop="auth-int"', "cannot answer the challenge: qop 'auth-int' offers no 'auth'"),
    ('Digest realm="r"', "cannot answer the challenge: the challenge lacks realm or nonce"),
])
def test_answer_refuses(challenge, message):
    with pytest.raises(ValueError) as err:
        digest.answer(challenge, method="INVITE", uri="sip:x", user="u", password="p")
    assert str(err.value) == message


def test_pick_takes_the_strongest():
    md5, sha = 'Digest realm="r", nonce="n", algorithm=MD5', 'Digest realm="r", nonce="n", algorithm=SHA-256'
    assert digest.pick([md5, sha]) == sha
    assert digest.pick(['Digest realm="r", nonce="n", algorithm=SHA-512-256', md5]) == md5
    assert digest.pick(['Digest realm="r", nonce="n"']) == 'Digest realm="r", nonce="n"'   # no algorithm: MD5
    with pytest.raises(ValueError) as err:
        digest.pick(['Digest realm="r", nonce="n", algorithm=SHA-512-256', 'Digest realm="r", algorithm=MD5-sess',
                     'Basic realm="r"', "Digest ,,,"])
    assert str(err.value) == ("no usable digest challenge among: Digest SHA-512-256, Digest MD5-SESS, Basic MD5, "
                              "an unreadable challenge")
    with pytest.raises(ValueError, match="no usable digest challenge among: none"):
        digest.pick([])


def test_parse_params_quoting():
    assert digest.parse_params('Digest realm="a, \\"b\\", c",nonce=abc ,  qop="auth,auth-int"  ') == (
        "Digest", {"realm": 'a, "b", c', "nonce": "abc", "qop": "auth,auth-int"})
    assert digest.parse_params("Digest") == ("Digest", {})


@pytest.mark.parametrize(("value", "message"), [
    ("", "authentication header '' does not start with a scheme"),
    ('Digest realm="r', "parameter 'realm' has no value (or an unclosed quote)"),
    ("Digest realm", "parameter 'realm' has no '='"),
    ('Digest realm="r" nonce="n"', "expected ',' after parameter 'realm', got 'nonce=\"n\"'"),
    ('Digest realm="r", Realm="s"', "parameter 'realm' is given twice"),
    ('Digest ="r"', "expected a parameter name at '=\"r\"'"),
])
def test_parse_params_errors(value, message):
    with pytest.raises(ValueError) as err:
        digest.parse_params(value)
    assert str(err.value) == message


# --- the server: every verdict ------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


URI = "sip:room1@192.168.1.20"


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def box(clock):
    return Challenger("edgeroom", {"alice": "Circle of Life", "bob": "pw"}, secret=b"k" * 32, clock=clock)


def creds(box: Challenger, *, which: int = 0, user: str = "alice", password: str = "Circle of Life", nc: int = 1,
          method: str = "INVITE", uri: str = URI, challenge: str | None = None) -> str:
    return digest.answer(challenge or box.challenge()[which], method=method, uri=uri, user=user, password=password,
                         nc=nc)


def test_challenge_shape(box):
    sha, md5 = box.challenge()
    assert sha.startswith('Digest realm="edgeroom", nonce="') and ", algorithm=SHA-256, qop=\"auth\", opaque=" in sha
    assert ", algorithm=MD5, " in md5 and "stale" not in sha
    assert all(c.endswith(", stale=true") for c in box.challenge(stale=True))
    assert digest.parse_params(sha)[1]["nonce"] == digest.parse_params(md5)[1]["nonce"]
    assert digest.parse_params(box.challenge()[0])[1]["nonce"] != digest.parse_params(sha)[1]["nonce"]
    only = Challenger("r", {}, algorithms=("MD5",))
    assert [digest.parse_params(c)[1]["algorithm"] for c in only.challenge()] == ["MD5"]
    with pytest.raises(ValueError, match="digest algorithms must be among MD5, SHA-256; got SHA-512"):
        Challenger("r", {}, algorithms=("SHA-512",))


@pytest.mark.parametrize("which", [0, 1], ids=["SHA-256", "MD5"])
def test_round_trip_ok(box, which):
    assert box.verify("INVITE", creds(box, which=which), uri=URI) == Verdict(True, "alice", "ok")


def test_no_credentials(box):
    assert box.verify("INVITE", None) == Verdict(False, None, "no_credentials")


@pytest.mark.parametrize("mangle", [
    lambda c: "Basic YWxpY2U6cHc=",
    lambda c: c.replace('realm="edgeroom"', 'realm="elsewhere"'),
    lambda c: c.replace("algorithm=SHA-256", "algorithm=MD5-sess"),
    lambda c: c.replace("qop=auth", "qop=auth-int"),
    lambda c: c.replace("nc=00000001", "nc=1"),
    lambda c: c.replace('uri="', 'x="'),
    lambda c: c[:-5],
    lambda c: "Digest ,,,",
], ids=["basic", "realm", "sess", "auth-int", "nc", "no-uri", "cut", "garbage"])
def test_bad_header(box, mangle):
    verdict = box.verify("INVITE", mangle(creds(box)))
    assert (verdict.ok, verdict.reason) == (False, "bad_header")


def test_bad_header_for_another_request_uri_or_a_refused_algorithm(box, clock):
    assert box.verify("INVITE", creds(box), uri="sip:other@h").reason == "bad_header"
    sha_only = Challenger("edgeroom", {"alice": "Circle of Life"}, algorithms=("SHA-256",), clock=clock)
    md5 = creds(sha_only, challenge=sha_only.challenge()[0].replace("SHA-256", "MD5"))
    assert sha_only.verify("INVITE", md5) == Verdict(False, "alice", "bad_header")


def test_unknown_user(box):
    assert box.verify("INVITE", creds(box, user="mallory")) == Verdict(False, "mallory", "unknown_user")


def test_wrong_password_and_wrong_method(box):
    assert box.verify("INVITE", creds(box, password="guess")) == Verdict(False, "alice", "wrong_digest")
    assert box.verify("BYE", creds(box)) == Verdict(False, "alice", "wrong_digest")


def test_forged_nonces(box, clock):
    other = Challenger("edgeroom", {"alice": "Circle of Life"}, secret=b"x" * 32, clock=clock)
    assert box.verify("INVITE", creds(other)) == Verdict(False, "alice", "bad_nonce")
    assert box.verify("INVITE", creds(box).replace('opaque="', 'opaque="x')).reason == "bad_nonce"
    made_up = 'Digest realm="edgeroom", nonce="not-base64!", algorithm=MD5, qop="auth"'
    assert box.verify("INVITE", creds(box, challenge=made_up)).reason == "bad_nonce"
    # the box's own nonce with a stray character: b64decode would skip it, the box does not
    challenge = box.challenge()[0]
    nonce = digest.parse_params(challenge)[1]["nonce"]
    spiked = challenge.replace(nonce, nonce[:5] + "!" + nonce[5:])
    assert box.verify("INVITE", creds(box, challenge=spiked)).reason == "bad_nonce"


def test_stale_nonce(box, clock):
    answer = creds(box)
    clock.now += 300.5
    assert box.verify("INVITE", answer) == Verdict(False, "alice", "stale_nonce")
    fresh = creds(box, challenge=box.challenge(stale=True)[0])
    assert box.verify("INVITE", fresh).ok


def test_nonce_from_the_future_is_stale(box, clock):
    answer = creds(box)
    clock.now -= 10
    assert box.verify("INVITE", answer).reason == "stale_nonce"


def test_replayed_nc_with_qop(box):
    challenge = box.challenge()[0]
    first = creds(box, challenge=challenge, nc=1)
    assert box.verify("INVITE", first).ok
    assert box.verify("INVITE", first) == Verdict(False, "alice", "replayed_nonce")
    assert box.verify("BYE", creds(box, challenge=challenge, nc=3, method="BYE")).ok
    assert box.verify("INVITE", creds(box, challenge=challenge, nc=2)).reason == "replayed_nonce"
    assert box.verify("INVITE", creds(box, challenge=challenge, nc=4)).ok


def test_nonce_without_qop_is_good_once(box):
    challenge = box.challenge()[1].replace(', qop="auth"', "")
    once = creds(box, challenge=challenge)
    assert "qop" not in digest.parse_params(once)[1]
    assert box.verify("INVITE", once) == Verdict(True, "alice", "ok")
    assert box.verify("INVITE", once).reason == "replayed_nonce"
    assert box.verify("INVITE", creds(box, challenge=box.challenge()[1])).ok   # the next challenge's nonce
    # a nonce first used without qop cannot go on with qop
    assert box.verify("INVITE", creds(box, challenge=challenge.replace("opaque=", 'qop="auth", opaque='),
                                      nc=2)).reason == "replayed_nonce"


def test_wrong_digest_does_not_burn_the_nc(box):
    challenge = box.challenge()[0]
    assert box.verify("INVITE", creds(box, challenge=challenge, nc=5, password="guess")).reason == "wrong_digest"
    assert box.verify("INVITE", creds(box, challenge=challenge, nc=1)).ok


def test_replay_memory_is_bounded_and_forgotten_nonces_are_stale(clock):
    box = Challenger("edgeroom", {"alice": "pw"}, clock=clock, max_nonces=3)
    answers = []
    for _ in range(5):
        answers.append(creds(box, password="pw"))
        clock.now += 1
    for value in answers:
        assert box.verify("INVITE", value).ok
    assert len(box._used) == 3
    assert box.verify("INVITE", answers[0]).reason == "stale_nonce"     # forgotten: not accepted again
    assert box.verify("INVITE", answers[1]).reason == "stale_nonce"
    assert box.verify("INVITE", answers[4]).reason == "replayed_nonce"  # still remembered


def test_expired_nonces_leave_the_memory(box, clock):
    assert box.verify("INVITE", creds(box)).ok
    clock.now += 301
    assert box.verify("INVITE", creds(box)).ok
    assert len(box._used) == 1


def test_every_reason_is_reached():
    assert set(digest.REASONS) == {"ok", "no_credentials", "bad_header", "unknown_user", "bad_nonce", "stale_nonce",
                                   "replayed_nonce", "wrong_digest"}
