"""The volume config model: parsing, every validation error, secrets, round trips."""

from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from azfs.errors import UserError
from azfs.secret import Secret
from azfs.volumes.model import (
    MAX_CONFIG_BYTES,
    MAX_VOLUMES,
    Volume,
    VolumeConfigError,
    dump_volumes,
    dump_yaml,
    load_yaml_file,
    load_yaml_text,
    parse_volumes,
    validate_name,
)

PASSWORD = "s3cr3t-Pa55word+/="
CONCEPT = f"""\
volumes:
- name: azure-shard-1
  mount:
    at: requested
    fstype: cifs
    path: //ACCOUNT.file.core.windows.net/vfolder
    options: vers=3.0,username=ACCOUNT,password={PASSWORD},dir_mode=0777,file_mode=0777,sec=ntlmssp
- name: local
  mount:
    at: startup
    fstype: bind
    path: /srv/data
    options: ro
"""


def doc() -> dict:
    return yaml.safe_load(CONCEPT)


def errors_of(data: object) -> list[str]:
    with pytest.raises(VolumeConfigError) as info:
        parse_volumes(data)
    assert isinstance(info.value, UserError)
    return info.value.errors


def test_concept_example_parses_and_splits_the_password() -> None:
    shard, local = parse_volumes(doc())
    assert shard.name == "azure-shard-1"
    assert shard.mount.at == "requested"
    assert shard.mount.fstype == "cifs"
    assert shard.mount.path == "//ACCOUNT.file.core.windows.net/vfolder"
    assert shard.mount.options == ("vers=3.0,username=ACCOUNT,dir_mode=0777,file_mode=0777,"
                                   "sec=ntlmssp")
    assert shard.mount.password == Secret(PASSWORD)
    assert local.mount.password is None and local.mount.options == "ro"


def test_secret_never_in_repr_str_or_default_dump() -> None:
    volumes = parse_volumes(doc())
    for text in (repr(volumes), str(volumes), repr(volumes[0].mount), str(volumes[0].mount),
                 dump_yaml(volumes), str(dump_volumes(volumes))):
        assert PASSWORD not in text
    assert "password=***" in dump_yaml(volumes)


def test_text_round_trip_with_secrets() -> None:
    assert dump_yaml(load_yaml_text(CONCEPT), show_secrets=True) == CONCEPT


def test_model_round_trip() -> None:
    volumes = parse_volumes(doc())
    assert parse_volumes(dump_volumes(volumes, show_secrets=True)) == volumes


def mutate(path: str, value: object) -> dict:
    """The concept document with one field set (``value is DELETE`` removes it)."""
    data = copy.deepcopy(doc())
    node: object = data
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]  # type: ignore[index]
    if value is DELETE:
        del node[keys[-1]]  # type: ignore[union-attr]
    else:
        node[keys[-1]] = value  # type: ignore[index]
    return data


DELETE = object()


@pytest.mark.parametrize(("path", "value", "message"), [
    ("volumes.1.mount.at", "sometimes",
     "volumes[1].mount.at: must be 'startup' or 'requested'"),
    ("volumes.1.mount.at", True, "volumes[1].mount.at: must be a string, not a boolean"),
    ("volumes.0.mount.at", DELETE, "volumes[0].mount.at: missing"),
    ("volumes.0.mount.fstype", DELETE, "volumes[0].mount.fstype: missing"),
    ("volumes.0.mount.path", DELETE, "volumes[0].mount.path: missing"),
    ("volumes.0.mount.path", "", "volumes[0].mount.path: missing"),
    ("volumes.0.name", DELETE, "volumes[0].name: missing"),
    ("volumes.0.mount", DELETE, "volumes[0].mount: missing"),
    ("volumes.0.mount", "cifs", "volumes[0].mount: must be a mapping"),
    ("volumes.1.mount.fstype", "zfs-magic", "volumes[1].mount.fstype: unknown fstype 'zfs-magic'"),
    ("volumes.0.mount.path", "ACCOUNT.file.core.windows.net/vfolder",
     "volumes[0].mount.path: malformed cifs path"),
    ("volumes.0.mount.path", "//ACCOUNT.file.core.windows.net",
     "volumes[0].mount.path: malformed cifs path"),
    ("volumes.0.mount.path", r"\\ACCOUNT\vfolder", "volumes[0].mount.path: malformed cifs path"),
    ("volumes.0.mount.path", "//ACCOUNT/share/../etc",
     "volumes[0].mount.path: must not contain '..'"),
    ("volumes.1.mount.path", "relative/dir",
     "volumes[1].mount.path: a bind volume needs an absolute"),
    ("volumes.1.mount.path", "/srv/../etc", "volumes[1].mount.path: must not contain '..'"),
    ("volumes.0.mount.options", ["vers=3.0"], "volumes[0].mount.options: must be a string"),
    ("volumes.0.mount.options", "vers=3.0,password=a,password=b",
     "volumes[0].mount.options: password given more than once"),
    ("volumes.0.mount.options", "password=", "volumes[0].mount.options: password= has an empty"),
    ("volumes.0.mount.options", "vers=3.0\nx",
     "volumes[0].mount.options: must not contain control"),
    ("volumes.0.mount.options", "a b=c", "volumes[0].mount.options: malformed option"),
    ("volumes.1.mount.options", "password=hunter2",
     "volumes[1].mount.options: password= is only supported for cifs/smb3"),
    ("volumes.0.mount.cache", "strict", "volumes[0].mount.cache: unknown key"),
    ("volumes.0.size", 10, "volumes[0].size: unknown key"),
    ("volumes.0.name", 42, "volumes[0].name: must be a string, not a number"),
    ("volumes.1.name", "azure-shard-1", "volumes[1].name: duplicate name 'azure-shard-1' "
                                        "(also volumes[0])"),
    ("volumes.0.name", "a/b", "volumes[0].name: must not contain '/'"),
    ("volumes.0.name", "..", "volumes[0].name: must start with a letter or digit"),
    ("volumes.0.name", "../etc", "volumes[0].name: must not contain '/'"),
    ("volumes.0.name", ".hidden", "volumes[0].name: must start with a letter or digit"),
    ("volumes.0.name", "my volume", "volumes[0].name: must not contain spaces"),
    ("volumes.0.name", "données", "volumes[0].name: must be ASCII"),
    ("volumes.0.name", "卷", "volumes[0].name: must be ASCII"),
    ("volumes.0.name", "", "volumes[0].name: must not be empty"),
    ("volumes.0.name", "x" * 65, "volumes[0].name: must be at most 64 characters"),
    ("volumes.0.name", "a:b", "volumes[0].name: may contain only"),
    ("volumes.0.name", "a\x00b", "volumes[0].name: may contain only"),
])
def test_each_validation_error_names_entry_and_field(path: str, value: object,
                                                     message: str) -> None:
    errors = errors_of(mutate(path, value))
    assert any(e.startswith(message) for e in errors), errors
    # the user-facing message never carries the password of another entry
    assert all(PASSWORD not in e for e in errors)


@pytest.mark.parametrize(("data", "message"), [
    (None, "the document must be a mapping"),
    ([], "the document must be a mapping"),
    ({}, "volumes: missing"),
    ({"volumes": "x"}, "volumes: must be a list"),
    ({"volumes": [], "extra": 1}, "unknown key(s) at top level: extra"),
    ({"volumes": [1]}, "volumes[0]: must be a mapping"),
])
def test_document_shape_errors(data: object, message: str) -> None:
    assert any(e.startswith(message) for e in errors_of(data))


def test_empty_volume_list_is_valid() -> None:
    assert parse_volumes({"volumes": []}) == []
    assert parse_volumes({"volumes": None}) == []


def test_all_errors_reported_at_once() -> None:
    data = mutate("volumes.0.mount.at", "never")
    data["volumes"][1]["mount"]["fstype"] = "floppy"
    with pytest.raises(VolumeConfigError) as info:
        parse_volumes(data)
    assert len(info.value.errors) == 2
    assert "volumes[0].mount.at" in str(info.value)
    assert "volumes[1].mount.fstype" in str(info.value)


def test_error_message_is_bounded() -> None:
    data = {"volumes": [{"name": f"v{i}", "mount": {"at": "x", "fstype": "bind",
                                                    "path": "/d"}} for i in range(50)]}
    with pytest.raises(VolumeConfigError) as info:
        parse_volumes(data)
    assert len(info.value.errors) == 50
    assert "and 40 more" in str(info.value)
    assert "\n" not in str(info.value)


def test_secret_does_not_leak_into_malformed_option_error() -> None:
    errors = errors_of(mutate("volumes.0.mount.options", f"vers=3.0,pass word={PASSWORD}"))
    assert errors and all(PASSWORD not in e for e in errors)


@pytest.mark.parametrize("text", [
    "volumes:\n  - name: a\n   mount: {",
    "volumes: [\n",
    "volumes:\n\t- name: a\n",
    ": : :",
])
def test_broken_yaml_is_a_clear_error(text: str) -> None:
    with pytest.raises(VolumeConfigError) as info:
        load_yaml_text(text, "v.yaml")
    assert str(info.value).startswith("invalid volume config: v.yaml: broken YAML")


def test_broken_yaml_names_line_and_column() -> None:
    with pytest.raises(VolumeConfigError, match=r"line 5, column 1: expected ',' or ']'"):
        load_yaml_text("volumes:\n- name: a\n  mount: [\n  x: y\n", "v.yaml")


def test_ten_megabyte_config_is_refused(tmp_path) -> None:
    entry = "- name: v{i}\n  mount: {{at: requested, fstype: bind, path: /srv/{pad}}}\n"
    text = "volumes:\n" + "".join(entry.format(i=i, pad="p" * 200) for i in range(45000))
    assert len(text) > 10 * 1024 * 1024
    with pytest.raises(VolumeConfigError, match=f"at most {MAX_CONFIG_BYTES} bytes"):
        load_yaml_text(text)
    big = tmp_path / "big.yaml"
    big.write_text(text)
    with pytest.raises(VolumeConfigError, match=f"{big}: .* at most {MAX_CONFIG_BYTES} bytes"):
        load_yaml_file(big)


def test_too_many_volumes_is_refused() -> None:
    data = {"volumes": [{"name": f"v{i}", "mount": {"at": "requested", "fstype": "bind",
                                                    "path": "/d"}}
                        for i in range(MAX_VOLUMES + 1)]}
    assert any(f"at most {MAX_VOLUMES}" in e for e in errors_of(data))


def test_file_errors(tmp_path) -> None:
    with pytest.raises(VolumeConfigError, match="cannot read"):
        load_yaml_file(tmp_path / "missing.yaml")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00volumes")
    with pytest.raises(VolumeConfigError, match="not UTF-8"):
        load_yaml_file(binary)


def test_yaml_bool_and_number_coercions_are_refused() -> None:
    text = "volumes:\n- name: 2024\n  mount: {at: yes, fstype: bind, path: /d}\n"
    errors = errors_of(yaml.safe_load(text))
    assert "volumes[0].name: must be a string, not a number" in errors
    assert "volumes[0].mount.at: must be a string, not a boolean" in errors


@pytest.mark.parametrize("path", [
    "//ACCOUNT.file.core.windows.net/vfolder",
    "//10.0.0.5/share/sub/dir",
    "//host/share/",
])
def test_good_cifs_paths(path: str) -> None:
    assert parse_volumes(mutate("volumes.0.mount.path", path))[0].mount.path == path


def test_other_fstypes_pass_through() -> None:
    data = {"volumes": [
        {"name": "scratch", "mount": {"at": "startup", "fstype": "tmpfs", "path": "tmpfs",
                                      "options": "size=1g"}},
        {"name": "nas", "mount": {"at": "requested", "fstype": "nfs4",
                                  "path": "nas.example.com:/export"}},
    ]}
    scratch, nas = parse_volumes(data)
    assert scratch.mount.options == "size=1g" and nas.mount.options == ""
    assert errors_of({"volumes": [{"name": "n", "mount": {"at": "requested", "fstype": "nfs",
                                                          "path": "nas"}}]})


def test_validate_name_accepts_the_documented_alphabet() -> None:
    for name in ("a", "azure-shard-1", "A.b_c-9", "9" * 64):
        assert validate_name(name) == name


names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
words = st.from_regex(r"[A-Za-z0-9_.-]{1,8}", fullmatch=True)
values = st.from_regex(r"[A-Za-z0-9_./:+-]{0,12}", fullmatch=True)
secrets = st.from_regex(r"[A-Za-z0-9+/=!@#$%^&*.-]{1,30}", fullmatch=True)


@given(name=names, at=st.sampled_from(["startup", "requested"]),
       opts=st.lists(st.tuples(words, st.one_of(st.none(), values)), max_size=5),
       password=st.one_of(st.none(), secrets))
def test_any_valid_cifs_volume_round_trips(name, at, opts, password) -> None:
    opts = [(k, v) for k, v in opts if k.lower() not in ("password", "pass")]
    options = ",".join(k if v is None else f"{k}={v}" for k, v in opts)
    if password is not None:
        options += f",password={password}"
    data = {"volumes": [{"name": name, "mount": {"at": at, "fstype": "cifs",
                                                 "path": "//acct.file.core.windows.net/s",
                                                 "options": options}}]}
    volumes = parse_volumes(data)
    assert isinstance(volumes[0], Volume)
    assert parse_volumes(yaml.safe_load(dump_yaml(volumes, show_secrets=True))) == volumes
    if password is not None:
        assert volumes[0].mount.password == Secret(password)
        assert "password=" not in volumes[0].mount.options
        assert f"password={password}" not in dump_yaml(volumes)
