"""The example clients in clients/examples/ (Node.js, C++, Java), built from the Apache Thrift compiler's code, run
against a real worker and get what ringlm's own Python client gets: the same token ids for a text, the same tokens
for a seeded generate, a stream that adds up to the non-streamed result, and the IDL's typed exceptions
(InvalidRequest naming its field, Overloaded with its retry-after, Unauthorized), over TLS and the token too.

`make clients` (a prerequisite of `make test`) installs the compilers and libraries and builds the examples; the
fixture below runs the example's own make target once per session too, so that a test run alone is up to date.
A language is skipped only when what it needs is not installed, with a message naming it."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from ringlm.idl import ringlm_thrift as thrift
from tests.server_helpers import connect, free_port, running_worker, tiny_model_folder, write_certificates

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "clients" / "examples"
TEXT = "naïve café ☕, 0.5 s: Hello world!"
MAX_TOKENS, TEMPERATURE, SEED = 12, 0.8, 7
RUN_TIMEOUT_S = 120


@dataclass(frozen=True)
class Language:
    name: str
    make_target: str                     # relative to the repository root
    command: tuple[str, ...]             # runs the built example
    needs: tuple[tuple[str, str], ...]   # (what, path or program name) that must exist before it can build
    fetched: tuple[tuple[str, str], ...] = ()   # (what, path) its make target downloads, from a registry

    def missing(self, needs=None) -> list[str]:
        return [what for what, thing in (self.needs if needs is None else needs)
                if not (Path(thing).exists() if thing.startswith("/") else shutil.which(thing))]


LANGUAGES = {
    "nodejs": Language("nodejs", "clients/examples/nodejs/node_modules/.installed",
                       ("node", str(EXAMPLES / "nodejs" / "example.js")),
                       (("Node.js (node)", "node"), ("npm", "npm"), ("the Thrift compiler", "thrift")),
                       (("npm's thrift package (npm ci)",
                         str(EXAMPLES / "nodejs" / "node_modules" / "thrift" / "package.json")),)),
    "cpp": Language("cpp", "clients/examples/cpp/build/ringlm_example",
                    (str(EXAMPLES / "cpp" / "build" / "ringlm_example"),),
                    (("a C++ compiler (g++)", "g++"), ("the Thrift compiler", "thrift"),
                     ("libthrift-dev", "/usr/include/thrift/Thrift.h"),
                     ("libboost-dev", "/usr/include/boost/numeric/conversion/cast.hpp"),
                     ("libssl-dev", "/usr/include/openssl/ssl.h"))),
    "java": Language("java", "clients/examples/java/build/.built",
                     ("java", "-jar", str(EXAMPLES / "java" / "build" / "ringlm-example.jar")),
                     (("a JDK (javac)", "javac"), ("the Thrift compiler", "thrift"),
                      ("libthrift-java", "/usr/share/java/thrift.jar"),
                      ("libslf4j-java", "/usr/share/java/slf4j-simple.jar"))),
}


@pytest.fixture(scope="session")
def built():
    """Builds (or finds up to date) each language's example once per session: {name: None or why it is skipped}."""
    subprocess.run(["make", "-C", str(ROOT), "--quiet", "client-libraries"], capture_output=True)
    reasons = {}
    for language in LANGUAGES.values():
        missing = language.missing()
        if missing:
            reasons[language.name] = f"{', '.join(missing)} not installed (`make clients` installs them)"
            continue
        # With everything installed, a build that fails is a failure of the test, not a skip.
        done = subprocess.run(["make", "-C", str(ROOT), language.make_target], capture_output=True, text=True)
        unfetched = language.missing(language.fetched) if done.returncode else []
        if unfetched:   # the registry could not be reached: installing it is impossible here
            reasons[language.name] = f"{', '.join(unfetched)} could not be installed: {done.stderr[-500:]}"
        else:
            reasons[language.name] = done if done.returncode else None
    return reasons


@pytest.fixture(params=sorted(LANGUAGES))
def language(request, built) -> Language:
    reason = built[request.param]
    if isinstance(reason, str):
        pytest.skip(f"{request.param}: {reason}")
    if reason is not None:
        pytest.fail(f"building the {request.param} example failed:\n{reason.stdout[-4000:]}{reason.stderr[-4000:]}")
    return LANGUAGES[request.param]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("other-languages") / "worker.log"
    with running_worker(tiny_model_folder(tmp_path_factory), log) as worker:
        yield worker


@pytest.fixture(scope="module")
def python_client(server):
    client = connect(server.port)
    yield client
    client.close()


def run_example(language: Language, port: int, *flags: str, env: dict | None = None) -> tuple[int, dict]:
    """(exit status, the JSON object it printed) of one run of the example."""
    done = subprocess.run([*language.command, "--port", str(port), *flags], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, env=env)
    lines = done.stdout.strip().splitlines()
    assert lines, f"{language.name} printed nothing (exit {done.returncode}):\n{done.stderr}"
    try:
        return done.returncode, json.loads(lines[-1])
    except json.JSONDecodeError:
        raise AssertionError(f"{language.name} printed no JSON:\n{done.stdout}\n{done.stderr}") from None


_outputs: dict[tuple[str, int], dict] = {}


def example_output(language: Language, port: int) -> dict:
    """The example's run with TEXT and the seeded options, run once per language and server."""
    key = (language.name, port)
    if key not in _outputs:
        status, output = run_example(language, port, "--text", TEXT, "--max-tokens", str(MAX_TOKENS),
                                     "--temperature", str(TEMPERATURE), "--seed", str(SEED))
        assert status == 0, output
        _outputs[key] = output
    return _outputs[key]


def python_generate(client, seed: int = SEED, **options):
    return client.generate(thrift.GenerateRequest(
        prompt=TEXT, max_tokens=MAX_TOKENS, sampling=thrift.SamplingOptions(temperature=TEMPERATURE, seed=seed),
        **options))


def test_token_ids_of_a_text_equal_the_python_clients(language, server, python_client):
    output = example_output(language, server.port)
    assert output["text_ids"] == python_client.tokenize(TEXT, True, False)
    assert python_client.detokenize(output["text_ids"], False) == TEXT   # non-ASCII text arrived intact


def test_a_seeded_generate_equals_the_python_clients(language, server, python_client):
    output = example_output(language, server.port)
    ours = python_generate(python_client)
    assert output["generate"]["token_ids"] == ours.token_ids and len(ours.token_ids) > 0
    assert output["generate"]["text"] == ours.text
    # The seed was sent and used: another seed draws other tokens (the tiny model's distribution is wide).
    assert python_generate(python_client, seed=SEED + 1).token_ids != ours.token_ids


def test_the_stream_yields_the_non_streamed_result(language, server):
    output = example_output(language, server.port)
    assert output["stream"]["text"] == output["generate"]["text"]
    assert output["stream"]["token_ids"] == output["generate"]["token_ids"]


@pytest.mark.parametrize("flags, field, options", [
    (("--max-tokens", "0"), "max_tokens", dict(max_tokens=0)),
    # the = form: a value that starts with a dash would read as a flag (Node.js' parseArgs refuses it)
    (("--temperature=-1",), "sampling.temperature", dict(sampling=thrift.SamplingOptions(temperature=-1.0)))])
def test_a_bad_argument_is_the_typed_exception_naming_its_field(language, server, python_client, flags, field,
                                                                options):
    status, output = run_example(language, server.port, "--text", "Hello", *flags)
    assert status != 0
    assert output["error"] == "InvalidRequest" and output["field"] == field and output["message"]
    with pytest.raises(thrift.InvalidRequest) as error:   # what the Python client gets for the same request
        python_client.generate(thrift.GenerateRequest(prompt="Hello", **options))
    assert (error.value.field, error.value.message) == (field, output["message"])


def test_a_refused_connection_is_reported_not_a_crash(language):
    status, output = run_example(language, free_port(), "--text", "Hello")
    assert status != 0 and output["error"] == "TransportError" and output["message"]


# -- TLS with a client certificate, and the auth token

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory):
    certificates = write_certificates(tmp_path_factory.mktemp("other-languages-tls"))
    (certificates / "token").write_text(TOKEN + "\n")
    flags = ["--tls-cert", str(certificates / "server.pem"), "--tls-key", str(certificates / "server.key"),
             "--tls-ca", str(certificates / "ca.pem"), "--auth-token-file", str(certificates / "token")]
    context = ssl.create_default_context(cafile=str(certificates / "ca.pem"))
    context.load_cert_chain(str(certificates / "client.pem"), str(certificates / "client.key"))
    log = tmp_path_factory.mktemp("other-languages-secure") / "worker.log"
    with running_worker(tiny_model_folder(tmp_path_factory), log, *flags, ssl_context=context) as worker:
        worker.certificates, worker.ssl_context = certificates, context
        yield worker


def tls_flags(certificates: Path) -> list[str]:
    return ["--tls", "--ca", str(certificates / "ca.pem"), "--cert", str(certificates / "client.pem"),
            "--key", str(certificates / "client.key")]


def test_tls_and_the_token_from_the_environment_are_served(language, secure_server):
    env = {**os.environ, "RINGLM_AUTH_TOKEN": TOKEN}
    status, output = run_example(language, secure_server.port, *tls_flags(secure_server.certificates),
                                 "--text", TEXT, "--max-tokens", "6", "--seed", "11", env=env)
    assert status == 0, output
    python_client = connect(secure_server.port, ssl_context=secure_server.ssl_context)
    try:
        python_client.authenticate(TOKEN)
        assert output["text_ids"] == python_client.tokenize(TEXT, True, False)
        assert output["generate"]["token_ids"] == python_client.generate(thrift.GenerateRequest(
            prompt=TEXT, max_tokens=6, sampling=thrift.SamplingOptions(temperature=TEMPERATURE, seed=11))).token_ids
    finally:
        python_client.close()
    assert output["stream"]["text"] == output["generate"]["text"]


def test_a_wrong_token_is_unauthorized(language, secure_server):
    env = {key: value for key, value in os.environ.items() if key != "RINGLM_AUTH_TOKEN"}
    status, output = run_example(language, secure_server.port, *tls_flags(secure_server.certificates),
                                 "--token", "not-the-token", env=env)
    assert status != 0 and output["error"] == "Unauthorized" and output["message"]


# -- Overloaded

@pytest.fixture(scope="module")
def crowded_server(tmp_path_factory):
    """A worker whose one stream is taken: a stream nobody polls stays open, so open_stream is Overloaded."""
    log = tmp_path_factory.mktemp("other-languages-crowded") / "worker.log"
    with running_worker(tiny_model_folder(tmp_path_factory), log, "--max-open-streams", "1") as worker:
        holder = connect(worker.port)
        try:
            holder.open_stream(thrift.GenerateRequest(prompt="Hello", max_tokens=4))
            yield worker
        finally:
            holder.close()


def test_overloaded_comes_with_its_retry_after(language, crowded_server):
    status, output = run_example(language, crowded_server.port, "--text", "Hello", "--max-tokens", "4")
    assert status != 0
    assert output["error"] == "Overloaded" and "streams are open" in output["message"]
    assert isinstance(output["retry_after_ms"], int) and output["retry_after_ms"] >= 0
    assert output["draining"] is False
