"""Every registered kind comes with what a user needs: a registry entry without its docs, its
sample config keys or its unit fails a test. The samples and units are checked in
test_config.py (every key of every part and every source kind documented in
config/edgeroom.toml) and test_units.py (the committed units are exactly what the catalog
renders); here: the docs, and that the lists the box uses are derived from the registries."""
from __future__ import annotations

from pathlib import Path

from services import catalog
from services.capture import sources
from services.runtime import config as configuration
from services.runtime.schema import SCHEMA, Section, Table
from services.vision import providers

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def _doc(name: str) -> str:
    return (DOCS / name).read_text()


def test_every_service_has_its_page_and_its_place_in_the_architecture_and_readme():
    architecture, readme = _doc("architecture.md"), (REPO / "README.md").read_text()
    for kind, spec in catalog.specs().items():
        assert spec.docs, f"service {kind!r} names no page under docs/ (ServiceSpec.docs)"
        assert (DOCS / spec.docs).is_file(), f"service {kind!r}: docs/{spec.docs} does not exist"
        assert f"`{kind}`" in architecture or f"| {kind} |" in architecture, f"docs/architecture.md lacks {kind}"
        assert f"`services/{kind}/`" in readme, f"README's table of folders lacks services/{kind}/"


def test_every_config_part_is_in_the_config_reference():
    config_doc = _doc("config.md")
    configuration.defaults()
    for name, part in SCHEMA.parts.items():
        heading = f"`[{name}]`" if isinstance(part, Section) else f"`[{name}.NAME]`"
        if isinstance(part, Table) and name in ("hooks", "services"):
            heading = f"`[{name}."
        assert heading in config_doc, f"docs/config.md has no {heading} for the config part [{name}]"


def test_every_source_kind_is_in_the_capture_page():
    capture = _doc("capture.md")
    for name, kind in sources.kinds().items():
        module = f"services/capture/sources/{kind.factory.__module__.rpartition('.')[2]}.py"
        row = next((line for line in capture.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"docs/capture.md's table of kinds has no row for {name!r}"
        assert module in row, f"docs/capture.md: the {name} row should name {module}"


def test_every_vision_provider_is_in_the_providers_page():
    page = _doc("vision-providers.md")
    for name in providers.names():
        assert f"| `{name}` |" in page, f"docs/vision-providers.md has no row for the provider {name!r}"
    assert configuration.defaults().vision.provider == "none"
    assert set(providers.names()) == {"mock", "openai", "gemini"}


def test_every_avatar_provider_is_in_the_avatar_page_and_the_config_accepts_it():
    from services.avatar import providers as avatars
    page = _doc("avatar.md")
    for name in avatars.names():
        assert f"| `{name}` |" in page, f"docs/avatar.md has no row for the avatar provider {name!r}"
        configuration.loads(f'[avatars.a]\nimage = "f.jpg"\nprovider = "{name}"\nurl = "http://127.0.0.1:1"\n', env={})
    assert set(avatars.names()) == {"websocket", "anam", "musetalk"}


def test_every_sync_hook_and_command_family_is_in_the_protocol_page():
    protocol = _doc("protocol.md")
    configuration.defaults()
    for hook in SCHEMA.sync_hooks:
        assert hook in protocol, f"docs/protocol.md does not mention the sync hook {hook}"
    for kind, spec in catalog.specs().items():
        for family in spec.commands:
            assert f"`{family}." in protocol, f"docs/protocol.md does not mention {kind}'s commands {family}.*"


def test_the_lists_the_box_uses_are_derived_from_the_registries():
    cfg = configuration.defaults()
    assert list(cfg.services) == list(catalog.specs()) == SCHEMA.services
    assert tuple(cfg.hooks) == tuple(SCHEMA.sync_hooks)
    assert catalog.command_owner("record") == "recorder" and catalog.command_owner("vision") == "vision"
    assert catalog.command_owner("nothing") is None
    # the kinds a source may have are exactly the registered ones
    from services.runtime.config import ConfigError
    try:
        configuration.loads("[sources.x]\nkind = 'nope'", env={})
    except ConfigError as exc:
        assert exc.reason == f"must be one of {', '.join(sources.kinds())}; got 'nope'"
    else:
        raise AssertionError("an unregistered kind was accepted")


def test_the_pipeline_transforms_of_the_config_are_the_pipelines_own():
    """The config names the transforms without importing OpenCV (the hub loads configs); this ties the
    two lists together so neither drifts."""
    from services.vision.pipeline.transforms import TRANSFORMS
    from services.vision.spec import TRANSFORMS as CONFIGURED
    assert tuple(TRANSFORMS) == CONFIGURED
