"""Configuration: the YAML file, the GB28181_* environment (a public contract that deployment
scripts rely on), one-line fault reports, the shipped configs/default.yaml and the API token file."""

from __future__ import annotations

import json
import os
import stat
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from gb28181.cli import main as cli_main
from gb28181.config import Config, ConfigError, UpstreamSection, ensure_api_token, load_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_YAML = REPO / "configs" / "default.yaml"


@pytest.fixture(autouse=True)
def _no_gb28181_env(monkeypatch):
    # A developer's or another test's GB28181_* variables must not change what we see.
    for name in list(os.environ):
        if name.upper().startswith("GB28181_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "gb28181.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path, **overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, **overrides)
    return str(info.value)


# -- environment beats the file ----------------------------------------------------------------

# (variable, file section, file key, file value, env value, read it back, expected,
#  a sibling key the file sets in the same section and its value, which must survive)
ENV_CASES = [
    ("GB28181_SIP__HOST", "sip", "host", "10.1.1.1", "127.0.0.2",
     lambda c: c.sip.host, "127.0.0.2", ("port", 5071)),
    ("GB28181_SIP__PORT", "sip", "port", 5070, "5099",
     lambda c: c.sip.port, 5099, ("host", "10.1.1.1")),
    ("GB28181_HTTP__HOST", "http", "host", "10.1.1.1", "127.0.0.3",
     lambda c: c.http.host, "127.0.0.3", ("port", 8081)),
    ("GB28181_HTTP__PORT", "http", "port", 8081, "18080",
     lambda c: c.http.port, 18080, ("host", "10.1.1.1")),
    ("GB28181_API__TOKEN", "api", "token", "file-token-123", "env-token-456",
     lambda c: c.api.token, "env-token-456", ("metrics_public", False)),
    ("GB28181_DATA_DIR", None, "data_dir", "/srv/from-file", "/srv/from-env",
     lambda c: c.data_dir, Path("/srv/from-env"), None),
    ("GB28181_SERVER__ID", "server", "id", "34020000002000000001", "44010000002000000009",
     lambda c: c.server.id, "44010000002000000009", ("name", "file-name")),
    ("GB28181_SERVER__DOMAIN", "server", "domain", "3402000000", "4401000000",
     lambda c: c.server.domain, "4401000000", ("name", "file-name")),
    ("GB28181_AUTH__DEFAULT_PASSWORD", "auth", "default_password", "file-pass", "env-pass",
     lambda c: c.auth.default_password, "env-pass", ("unknown_devices", "refuse")),
    ("GB28181_KEEPALIVE__INTERVAL", "keepalive", "interval", 30, "1.5",
     lambda c: c.keepalive.interval, 1.5, ("count", 7)),
    ("GB28181_KEEPALIVE__COUNT", "keepalive", "count", 5, "2",
     lambda c: c.keepalive.count, 2, ("interval", 17.0)),
]


@pytest.mark.parametrize("case", ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_documented_env_name_beats_the_file(tmp_path, monkeypatch, case):
    var, section, key, file_value, env_value, read, expected, sibling = case
    if section is None:
        doc = {key: file_value}
    else:
        doc = {section: {key: file_value}}
        if sibling is not None:
            doc[section][sibling[0]] = sibling[1]
    path = write(tmp_path, yaml.safe_dump(doc))

    # The file alone is read ...
    from_file = load_config(path)
    assert read(from_file) != expected
    # ... and the documented variable beats it.
    monkeypatch.setenv(var, env_value)
    cfg = load_config(path)
    assert read(cfg) == expected
    if sibling is not None:
        # Only that key is overridden: the rest of the file's section stays.
        assert getattr(getattr(cfg, section), sibling[0]) == sibling[1]


@pytest.mark.parametrize("case", ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_documented_env_name_works_without_a_file(monkeypatch, case):
    var, _section, _key, _file_value, env_value, read, expected, _sibling = case
    assert read(load_config(None)) != expected
    monkeypatch.setenv(var, env_value)
    assert read(load_config(None)) == expected


def test_env_also_beats_keyword_overrides(monkeypatch):
    monkeypatch.setenv("GB28181_SIP__PORT", "5099")
    cfg = load_config(None, sip={"host": "127.0.0.1", "port": 0})
    assert cfg.sip.port == 5099
    assert cfg.sip.host == "127.0.0.1"


def test_file_beats_defaults_and_unset_keys_keep_defaults(tmp_path):
    path = write(tmp_path, "sip:\n  port: 5070\nkeepalive:\n  count: 4\n")
    cfg = load_config(path)
    assert cfg.sip.port == 5070 and cfg.keepalive.count == 4
    defaults = Config()
    assert cfg.sip.host == defaults.sip.host
    assert cfg.keepalive.interval == defaults.keepalive.interval
    assert cfg.http == defaults.http


def test_empty_file_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")).model_dump() == load_config(None).model_dump()


def test_derived_values():
    cfg = load_config(None, data_dir="/var/lib/gb", server={"domain": "4401000000"})
    assert cfg.realm == "4401000000"
    assert cfg.database_path == Path("/var/lib/gb/gb28181.db")
    cfg = load_config(None, server={"realm": "myrealm"}, database={"path": "/tmp/x.db"})
    assert cfg.realm == "myrealm"
    assert cfg.database_path == Path("/tmp/x.db")


# -- faults: one line each, naming the key, what is allowed and the variable -------------------

def one_line(text: str) -> str:
    assert "\n" not in text, f"expected one line, got:\n{text}"
    assert text.startswith("config error: ")
    return text


def test_port_out_of_range(tmp_path):
    path = write(tmp_path, "sip:\n  port: 70000\n")
    msg = one_line(config_error(path))
    assert "sip.port" in msg
    assert "65535" in msg            # what is allowed
    assert "70000" in msg            # what we got
    assert "GB28181_SIP__PORT" in msg
    assert str(path) in msg


def test_port_out_of_range_from_env(monkeypatch):
    monkeypatch.setenv("GB28181_HTTP__PORT", "70000")
    msg = one_line(config_error(None))
    assert "http.port" in msg and "65535" in msg and "70000" in msg
    assert "GB28181_HTTP__PORT" in msg


def test_unknown_key_typo(tmp_path):
    path = write(tmp_path, "sip:\n  prot: 5070\n")
    msg = one_line(config_error(path))
    assert "sip.prot" in msg
    assert "unknown key" in msg
    assert "port" in msg.replace("sip.prot", "")   # the keys that are allowed
    assert "GB28181_SIP__PROT" in msg


def test_unknown_top_level_section(tmp_path):
    msg = one_line(config_error(write(tmp_path, "keepalvie:\n  count: 3\n")))
    assert "keepalvie" in msg and "unknown key" in msg
    assert "keepalive" in msg.replace("keepalvie", "")
    assert "GB28181_KEEPALVIE" in msg


def test_unknown_key_from_env(monkeypatch):
    monkeypatch.setenv("GB28181_SIP__PROT", "5070")
    msg = one_line(config_error(None))
    assert "sip.prot" in msg and "GB28181_SIP__PROT" in msg and "unknown key" in msg


def test_unknown_devices_maybe(tmp_path):
    msg = one_line(config_error(write(tmp_path, "auth:\n  unknown_devices: maybe\n")))
    assert "auth.unknown_devices" in msg
    assert "'admit'" in msg and "'refuse'" in msg
    assert "maybe" in msg
    assert "GB28181_AUTH__UNKNOWN_DEVICES" in msg


def test_19_digit_server_id(tmp_path):
    msg = one_line(config_error(write(tmp_path, "server:\n  id: '3402000000200000001'\n")))
    assert "server.id" in msg
    assert "20 digits" in msg
    assert "3402000000200000001" in msg
    assert "GB28181_SERVER__ID" in msg


def test_server_id_from_env(monkeypatch):
    monkeypatch.setenv("GB28181_SERVER__ID", "3402000000200000001")
    msg = one_line(config_error(None))
    assert "server.id" in msg and "20 digits" in msg and "GB28181_SERVER__ID" in msg


def test_bad_number_from_env(monkeypatch):
    monkeypatch.setenv("GB28181_KEEPALIVE__COUNT", "three")
    msg = one_line(config_error(None))
    assert "keepalive.count" in msg and "integer" in msg and "GB28181_KEEPALIVE__COUNT" in msg


@pytest.mark.parametrize("text, kind", [("- sip\n- http\n", "list"), ("just a string\n", "str"),
                                        ("42\n", "int")])
def test_non_mapping_yaml(tmp_path, text, kind):
    path = write(tmp_path, text)
    msg = one_line(config_error(path))
    assert str(path) in msg
    assert "mapping" in msg and kind in msg


def test_section_that_is_not_a_mapping(tmp_path):
    msg = one_line(config_error(write(tmp_path, "sip: 5060\n")))
    assert "sip" in msg and "GB28181_SIP" in msg


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "server:\n  id: '34020000002000000001'\nsip:\n  port: [5060\n  host: x\n")
    msg = one_line(config_error(path))
    assert str(path) in msg
    assert "not valid YAML" in msg
    assert "line 5" in msg


def test_tab_indented_yaml_names_the_line(tmp_path):
    msg = one_line(config_error(write(tmp_path, "sip:\n\tport: 5060\n")))
    assert "line 2" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    msg = one_line(config_error(path))
    assert str(path) in msg
    assert "cannot read" in msg


def test_several_faults_give_one_line_each(tmp_path):
    path = write(tmp_path, "sip:\n  port: 70000\n  prot: 1\nauth:\n  unknown_devices: maybe\n")
    lines = config_error(path).splitlines()
    assert len(lines) == 3
    assert all(line.startswith("config error: ") for line in lines)
    joined = "\n".join(lines)
    for var in ("GB28181_SIP__PORT", "GB28181_SIP__PROT", "GB28181_AUTH__UNKNOWN_DEVICES"):
        assert sum(var in line for line in lines) == 1, joined


def test_config_error_is_a_value_error(tmp_path):
    with pytest.raises(ValueError):
        load_config(write(tmp_path, "sip:\n  port: -1\n"))


# -- every key from the environment --------------------------------------------------------------

def env_var(path: tuple[str, ...]) -> str:
    return "GB28181_" + "__".join(path).upper()


def leaf_fields(model: type[BaseModel] = Config,
                path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], FieldInfo]]:
    """Every key that holds a value (lists and their models included), through the sections."""
    out: list[tuple[tuple[str, ...], FieldInfo]] = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += leaf_fields(field.annotation, path + (name,))
        else:
            out.append((path + (name,), field))
    return out


def _within(x: float, constraints: list[Any]) -> bool:
    return all((getattr(c, "ge", None) is None or x >= c.ge)
               and (getattr(c, "gt", None) is None or x > c.gt)
               and (getattr(c, "le", None) is None or x <= c.le)
               and (getattr(c, "lt", None) is None or x < c.lt) for c in constraints)


def sample(annotation: Any, default: Any = None, constraints: list[Any] | None = None) -> Any:
    """A valid value of this type other than ``default``, in the JSON form model_dump gives."""
    constraints = constraints or []
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return sample(args[0], default, [*constraints, *args[1:]])
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        # int | Literal["auto"] and the like: a value of the member the default is not.
        inner = next((a for a in members if get_origin(a) is not Literal or default not in get_args(a)),
                     members[0]) if len(members) > 1 else members[0]
        if len(members) > 1 and get_origin(inner) is not Literal and not isinstance(default, inner):
            default = None
        return sample(inner, default, constraints)
    if origin is Literal:
        return next(v for v in args if v != default)
    if origin is list:
        return [sample(args[0])]
    if origin is tuple:
        base = default if default is not None else tuple(0 for _ in args)
        return [sample(a, d) for a, d in zip(args, base, strict=True)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {name: sample(f.annotation, None if f.is_required() else f.default, f.metadata)
                for name, f in annotation.model_fields.items()}
    if annotation is bool:
        return not default
    if annotation in (int, float):
        base = default if default is not None else 0
        return next(annotation(x) for x in (base + 1, base - 1, base + 10, base * 2, base / 2)
                    if _within(x, constraints))
    if annotation is str:
        if default is None:
            return "set-from-env"
        if default.isdigit():       # an ID or a number-like password: keep its shape
            return default[:-1] + str((int(default[-1]) + 1) % 10)
        return default + "-env"
    if annotation is Path:
        return str(Path(default or ".") / "from-env")
    raise AssertionError(f"sample() does not know {annotation!r}: teach it this type")


def env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def dig(tree: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


LEAVES = leaf_fields()

#: Values sample() cannot make up: 20-digit IDs and patterned strings (in model_dump's JSON form).
SAMPLES: dict[tuple[str, ...], Any] = {
    ("upstreams",): [UpstreamSection(server_id="34020000002000000009", host="10.0.0.9", port=5061,
                                     share={"civil_codes": ["3402"]}).model_dump(mode="json")],
    ("recording", "schedule"): ["22:00-06:00"],
}


def test_the_walk_finds_every_key():
    def dotted(tree: dict, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for key, value in tree.items():
            out |= dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
        return out
    assert {".".join(path) for path, _ in LEAVES} == dotted(load_config(None).model_dump(mode="json"))
    assert {("data_dir",), ("tiers", "default"), ("tiers", "rules")} <= {p for p, _ in LEAVES}


@pytest.mark.parametrize("path, field", LEAVES, ids=[env_var(p) for p, _ in LEAVES])
def test_every_key_is_settable_from_the_environment(monkeypatch, path, field):
    value = SAMPLES.get(path) or sample(field.annotation, None if field.is_required() else field.default,
                                        field.metadata)
    assert dig(load_config(None).model_dump(mode="json"), path) != value
    monkeypatch.setenv(env_var(path), env_text(value))
    assert dig(load_config(None).model_dump(mode="json"), path) == value


def test_tier_from_env_text(monkeypatch):
    monkeypatch.setenv("GB28181_TIERS__DEFAULT", "1")
    monkeypatch.setenv("GB28181_TIERS__RULES", '[{"tier": "2", "industry": ["04"]}]')
    cfg = load_config(None)
    assert cfg.tiers.default == 1 and type(cfg.tiers.default) is int
    assert cfg.tiers.rules[0].tier == 2 and type(cfg.tiers.rules[0].tier) is int


@pytest.mark.parametrize("text", ["4", "0", "one", "1.5", ""])
def test_tier_still_one_of_three(monkeypatch, text):
    monkeypatch.setenv("GB28181_TIERS__DEFAULT", text)
    msg = one_line(config_error(None))
    assert "tiers.default" in msg and "1, 2 or 3" in msg and "GB28181_TIERS__DEFAULT" in msg
    assert repr(int(text) if text.isdigit() else text) in msg


def test_tier_rule_still_one_of_three(tmp_path):
    msg = one_line(config_error(write(tmp_path, "tiers:\n  rules:\n    - tier: 4\n")))
    assert "tiers.rules[0].tier" in msg and "1, 2 or 3" in msg and "(got 4)" in msg


# -- misnamed environment variables: one line each, naming the variable, the fix -------------------

# (variable as set, value, the cause named, the name meant)
MISNAMED = [
    ("GB28181_REGISTRAR__QUERY_DEVICE_INFO", "false", "unknown section 'registrar'",
     "GB28181_REGISTRATION__QUERY_DEVICE_INFO"),
    ("GB28181_SIPP__PORT", "5070", "unknown section 'sipp'", "GB28181_SIP__PORT"),
    ("GB28181_SIP__PROT", "1", "unknown key 'prot'", "GB28181_SIP__PORT"),
    ("gb28181_keepalive__cont", "4", "unknown key 'cont'", "GB28181_KEEPALIVE__COUNT"),
    ("GB28181_Registraton__Min_Expire", "30", "unknown section 'registraton'",
     "GB28181_REGISTRATION__MIN_EXPIRES"),
    ("GB28181_DATADIR", "/srv/gb", "unknown key 'datadir'", "GB28181_DATA_DIR"),
    ("GB28181_SIP____PORT", "5070", "empty key", "GB28181_SIP__PORT"),
    ("GB28181_SIP__PORT__UDP", "5070", "sip.port takes one value", "GB28181_SIP__PORT"),
    ("GB28181_TIERS__RULES__0__TIER", "1", "the whole list, as JSON", "GB28181_TIERS__RULES"),
]


@pytest.mark.parametrize("var, value, cause, meant", MISNAMED, ids=[c[0] for c in MISNAMED])
def test_misnamed_env_var_is_reported(monkeypatch, var, value, cause, meant):
    monkeypatch.setenv(var, value)
    msg = one_line(config_error(None))
    assert f"environment variable {var} " in msg
    assert cause in msg
    assert f"did you mean {meant}?" in msg
    assert f"rename or unset {var}" in msg


def test_misnamed_env_var_without_a_likely_meaning(monkeypatch):
    monkeypatch.setenv("GB28181_XYZZY__PORT", "1")
    msg = one_line(config_error(None))
    assert "GB28181_XYZZY__PORT" in msg and "unknown section 'xyzzy'" in msg
    assert "did you mean" not in msg
    assert "keepalive" in msg                       # what is allowed instead
    assert "rename or unset GB28181_XYZZY__PORT" in msg


def test_misnamed_env_vars_and_file_faults_one_line_each(tmp_path, monkeypatch):
    monkeypatch.setenv("GB28181_SIPP__PORT", "5070")
    monkeypatch.setenv("GB28181_SIP__PROT", "5070")        # pydantic sees this one too: once only
    monkeypatch.setenv("GB28181_SIP__PORT__UDP", "5070")   # ... and this one
    lines = config_error(write(tmp_path, "http:\n  port: 70000\n")).splitlines()
    assert len(lines) == 4, lines
    assert all(line.startswith("config error: ") for line in lines)
    for needle in ("GB28181_SIPP__PORT", "environment variable GB28181_SIP__PROT",
                   "GB28181_SIP__PORT__UDP", "GB28181_HTTP__PORT"):
        assert sum(needle in line for line in lines) == 1, (needle, lines)


@pytest.mark.parametrize("var, value", [
    ("GB28181_DATA_DIR", "/srv/gb"),
    ("gb28181_data_dir", "/srv/gb"),
    ("Gb28181_Sip__Port", "5070"),
    ("GB28181_SIP", '{"port": 5070}'),
    ("GB28181_TIERS", '{"default": 2, "rules": [{"tier": 1}]}'),
    ("GB28181_TIERS__RULES", '[{"tier": 1, "industry": ["04"], "name_contains": ["路口"]}]'),
])
def test_valid_env_names_are_not_flagged(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    load_config(None)


def test_check_config_reports_misnamed_env_vars_and_exits_2(monkeypatch, capsys):
    monkeypatch.setenv("GB28181_REGISTRAR__QUERY_DEVICE_INFO", "false")
    monkeypatch.setenv("GB28181_SIP__PROT", "5070")
    assert cli_main(["check-config"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert "GB28181_REGISTRAR__QUERY_DEVICE_INFO" in lines[0]
    assert "did you mean GB28181_REGISTRATION__QUERY_DEVICE_INFO?" in lines[0]
    assert "GB28181_SIP__PROT" in lines[1] and "did you mean GB28181_SIP__PORT?" in lines[1]
    assert all("rename or unset" in line for line in lines)


def test_check_config_takes_a_tier_from_env(monkeypatch, capsys):
    monkeypatch.setenv("GB28181_TIERS__DEFAULT", "1")
    assert cli_main(["check-config"]) == 0
    assert json.loads(capsys.readouterr().out)["tiers"]["default"] == 1


# -- the shipped example ------------------------------------------------------------------------

def _keys(tree) -> set[str]:
    out: set[str] = set()
    for key, value in tree.items():
        out.add(key)
        if isinstance(value, dict):
            out |= {f"{key}.{sub}" for sub in _keys(value)}
    return out


def test_default_yaml_equals_the_built_in_defaults():
    if not DEFAULT_YAML.exists():
        pytest.skip(f"{DEFAULT_YAML} does not exist (yet): nothing to compare with the defaults")
    from_file = load_config(DEFAULT_YAML)
    built_in = load_config(None)
    assert from_file.model_dump(mode="json") == built_in.model_dump(mode="json")
    # It shows every key, and no key the model does not know.
    shown = yaml.safe_load(DEFAULT_YAML.read_text(encoding="utf-8"))
    assert _keys(shown) == _keys(built_in.model_dump(mode="json"))


# -- the API token file --------------------------------------------------------------------------

def test_ensure_api_token_creates_a_private_file_once(tmp_path):
    data_dir = tmp_path / "data" / "nested"          # not there yet
    cfg = load_config(None, data_dir=str(data_dir))
    token, path = ensure_api_token(cfg)
    assert path == data_dir / "api-token"
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 16
    assert path.read_text(encoding="utf-8").strip() == token

    again, path2 = ensure_api_token(load_config(None, data_dir=str(data_dir)))
    assert (again, path2) == (token, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_ensure_api_token_prefers_the_configured_token(tmp_path, monkeypatch):
    cfg = load_config(None, data_dir=str(tmp_path), api={"token": "configured-123"})
    assert ensure_api_token(cfg) == ("configured-123", None)
    assert not (tmp_path / "api-token").exists()
    monkeypatch.setenv("GB28181_API__TOKEN", "from-env-12345")
    assert ensure_api_token(load_config(None, data_dir=str(tmp_path))) == ("from-env-12345", None)
    assert not (tmp_path / "api-token").exists()


def test_ensure_api_token_replaces_an_unusable_file(tmp_path):
    (tmp_path / "api-token").write_text("short\n")
    token, path = ensure_api_token(load_config(None, data_dir=str(tmp_path)))
    assert token != "short" and len(token) >= 16
    assert path.read_text().strip() == token


def test_short_configured_token_is_refused():
    msg = one_line(config_error(None, api={"token": "short"}))
    assert "api.token" in msg and "8 characters" in msg and "GB28181_API__TOKEN" in msg


# -- upstreams (cascade) ------------------------------------------------------------------------------

def test_upstream_defaults_come_from_its_server_id(tmp_path):
    cfg = load_config(write(tmp_path, "upstreams:\n  - server_id: '34020000002000000009'\n    host: 10.1.2.3\n"))
    up = cfg.upstreams[0]
    assert (up.id, up.domain, up.port, up.transport, up.share, up.local_id) == \
        ("34020000002000000009", "3402000000", 5060, "udp", "all", None)


def test_upstream_faults_name_the_item_and_the_list_variable(monkeypatch):
    monkeypatch.setenv("GB28181_UPSTREAMS", json.dumps(
        [{"server_id": "123", "host": "h", "transport": "sctp", "share": {"civil_codes": ["x1"]}}]))
    msg = config_error(None)
    assert len(msg.splitlines()) == 3, msg
    assert "upstreams[0].server_id" in msg and "20 digits" in msg
    assert "upstreams[0].transport" in msg and "upstreams[0].share.civil_codes[0]" in msg
    assert "GB28181_UPSTREAMS" in msg and "LITERAL" not in msg and "UPSTREAMSHARE" not in msg
    assert "Input should be 'all'" not in msg  # the other member of the union says what is wrong


def test_upstream_retry_bounds_are_ordered(tmp_path):
    text = "upstreams:\n  - {server_id: '34020000002000000009', host: h, retry_min: 30, retry_max: 10}\n"
    assert "retry_max must be at least retry_min" in config_error(write(tmp_path, text))
