"""Delta chains: the policy that bounds them, the format, and how reads check them."""

from __future__ import annotations

import pytest
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from tests.unit.golden_values import golden_values
from tierstore.codec import Codec
from tierstore.codec.chain import ChainLink, link_name, link_version, resolve_values
from tierstore.delta import ChainWriter
from tierstore.errors import ConfigurationError, CorruptPayload
from tierstore.policy import extend_chain
from tierstore.records import Payload

V1 = "00000000000000000000000000000001.0.25"
V2 = "00000000000000000000000000000002.0.5"
GOLDEN_LINKS = [
    ("msgpack+delta",
     "9501d9253030303030303030303030303030303030303030303030303030303030303031"
     "2e302e3235c00091c78c0594bd6c616e67636861696e5f636f72652e6d65737361676573"
     "2e68756d616eac48756d616e4d65737361676586a7636f6e74656e74a568656c6c6fb161"
     "64646974696f6e616c5f6b776172677380b1726573706f6e73655f6d6574616461746180"
     "a474797065a568756d616ea46e616d65c0a26964a26831b36d6f64656c5f76616c696461"
     "74655f6a736f6e"),
    ("msgpack+delta+zstd",
     "28b52ffd606d01dd0500f20a282b706bd201f99fdcbb42a6235814a58cec83fff14b349a"
     "94dbff3251f24e0b65d6971cd0ee8ee788003c2339ba8ca0b0af1cb27d1816050bc5d27d"
     "41f3e2819dfb526eb72b1e7f583e167c574afe4149435326efb3373e85ac2b61742a136e"
     "9c33242877ddec64ec15073ad8da91ad311badd8ba6bc2e1c0a080228f189b33e343e8ec"
     "529a6fabd1bb8c880001000d08260241093d12c125821282a4810b231108004b051f51e1"
     "7a057c6e1a27178bba8c8969204611bc01"),
]
"""A snapshot of the golden messages' first item, then a delta adding the second."""


@pytest.fixture
def codec() -> Codec:
    return Codec(JsonPlusSerializer())


@pytest.mark.parametrize(("deltas", "snapshot_bytes", "tail_bytes", "max_deltas", "delta"), [
    (0, 1000, 100, 8, True),      # a first delta
    (7, 1000, 900, 8, True),      # the last one the bound allows
    (8, 1000, 900, 8, False),     # one more would pass max_deltas
    (3, 1000, 1000, 8, True),     # tails as heavy as the snapshot: still cheaper
    (3, 1000, 1001, 8, False),    # tails outweigh the snapshot
    (0, 0, 1, 8, False),          # an empty snapshot: anything outweighs it
    (0, 1000, 100, 0, False),     # deltas off by bound
    (-1, 1000, 100, 8, False),    # nonsense counts never extend
])
def test_extend_chain(deltas: int, snapshot_bytes: int, tail_bytes: int, max_deltas: int,
                      delta: bool) -> None:
    assert extend_chain(deltas=deltas, snapshot_bytes=snapshot_bytes, tail_bytes=tail_bytes,
                        max_deltas=max_deltas) is delta


def test_golden_links_stay_readable(codec: Codec) -> None:
    messages = golden_values()["messages"]
    links = {link_name(i, "messages"): codec.decode(Payload(tag, bytes.fromhex(data)))
             for i, (tag, data) in enumerate(GOLDEN_LINKS)}
    resolved = resolve_values({"messages": V2}, links, where="golden")
    assert resolved.values == {"messages": messages}


def test_link_versions_drop_the_padding_only() -> None:
    assert link_version(V2) == "2.0.5"
    assert link_version("7") == "7"
    assert link_version("1.5") == "1.5"
    # a delta's stored version names its base: the same version over another base is
    # another blob, never a no-op write over different bytes
    assert link_version(V2, V1).startswith("2.0.5@")
    assert link_version(V2, V1) != link_version(V2, "00000000000000000000000000000001.0.7")


def test_links_never_pass_for_values(codec: Codec) -> None:
    payload = codec.encode_link(ChainLink(V1, None, 0, [1, 2]))
    assert payload.tag.startswith("msgpack+delta")
    with pytest.raises(CorruptPayload):  # stored under the channel's own name
        resolve_values({"c": V1}, {"c": codec.decode(payload)}, where="x")


def test_a_serde_tag_ending_in_the_delta_stage_is_refused() -> None:
    class Odd(JsonPlusSerializer):
        def dumps_typed(self, obj: object) -> tuple[str, bytes]:
            return "x+delta", b""

    with pytest.raises(ConfigurationError):
        Codec(Odd()).encode(1)


def chain(*links: ChainLink) -> dict[str, object]:
    return {link_name(i, "c"): link for i, link in enumerate(links)}


@pytest.mark.parametrize("links", [
    {link_name(1, "c"): ChainLink(V2, V1, 1, [2])},                     # base missing
    chain(ChainLink(V1, None, 0, [1]), ChainLink(V2, "other", 1, [2])),  # wrong base
    chain(ChainLink(V1, None, 0, [1]), ChainLink(V2, V1, 2, [2])),       # wrong length
    chain(ChainLink(V1, None, 0, [1])),                                  # ends too early
    {link_name(0, "c"): [1, 2]},                                         # not a link
])
def test_a_broken_chain_names_its_channel(links: dict[str, object]) -> None:
    with pytest.raises(CorruptPayload, match="channel 'c'"):
        resolve_values({"c": V2}, links, where="x")


def test_a_chain_replays_in_order() -> None:
    links = chain(ChainLink(V1, None, 0, [1]), ChainLink(V2, V1, 1, [2, 3]))
    assert resolve_values({"c": V2}, links, where="x").values == {"c": [1, 2, 3]}


BIG = "".join(f"{(i * 7919) % 10007:05}" for i in range(200))  # compresses little


def test_only_an_extension_becomes_a_delta(codec: Codec) -> None:
    writer = ChainWriter(max_deltas=8)
    key = ("t", "", "c")
    first = writer.next(codec, key, [BIG, "b"], V1)
    assert len(first.links) == 1
    writer.remember(key, first)
    second = writer.next(codec, key, [BIG, "b", "c"], V2)
    assert [name for name, _, _ in second.links] == ["~0~c", "~1~c"]
    changed = writer.next(codec, key, [BIG, "B", "c"], V2)  # item 1 replaced
    assert len(changed.links) == 1


@pytest.mark.parametrize(("stored", "written"), [
    ([1, 2], [1.0, 2.0, 3.5]),          # equal, but floats now
    ([True], [1, 2]),                   # True == 1
    ([{"a": 1, "b": 2}], [{"b": 2, "a": 1}, 3]),  # equal dicts, another key order
    ([0.0], [-0.0, 1]),                 # 0.0 == -0.0
])
def test_items_that_compare_equal_but_encode_differently_start_a_snapshot(
        codec: Codec, stored: list[object], written: list[object]) -> None:
    writer = ChainWriter(max_deltas=8)
    key = ("t", "", "c")
    writer.remember(key, writer.next(codec, key, [BIG, *stored], V1))
    chain = writer.next(codec, key, [BIG, *written], V2)
    assert len(chain.links) == 1  # the whole list again, never the old items


def test_an_item_changed_in_place_starts_a_snapshot(codec: Codec) -> None:
    writer = ChainWriter(max_deltas=8)
    key = ("t", "", "c")
    item = {"k": "orig"}
    value = [BIG, item]
    writer.remember(key, writer.next(codec, key, value, V1))
    item["k"] = "mutated"  # the same object, other contents
    chain = writer.next(codec, key, [*value, "c"], V2)
    assert len(chain.links) == 1
    link = codec.decode(chain.links[0][2])
    assert link.items[1] == {"k": "mutated"}


def test_a_chain_learned_from_a_read_is_checked_on_its_stored_bytes(codec: Codec) -> None:
    writer = ChainWriter(max_deltas=8)
    key = ("t", "", "c")
    stored = writer.next(codec, key, [BIG, {"k": "orig"}], V1)
    links = tuple((name, codec.decode(payload)) for name, _, payload in stored.links)
    value = [BIG, links[0][1].items[1]]  # the objects a read hands to the graph
    writer.remember_read("t", "", {"c": links}, {"c": value},
                         {name: payload for name, _, payload in stored.links})
    value[1]["k"] = "mutated"  # the graph changes a read item in place
    assert len(writer.next(codec, key, [*value, "c"], V2).links) == 1
    unchanged = [BIG, {"k": "orig"}, "c"]
    assert [n for n, _, _ in writer.next(codec, key, unchanged, V2).links] == ["~0~c", "~1~c"]


def test_a_chain_read_back_as_written_keeps_its_digests(codec: Codec) -> None:
    """Reading back the chain this writer stored (LangGraph reads the head before every
    turn) needs no second decode: the same names and versions are the same bytes."""
    writer = ChainWriter(max_deltas=8)
    key = ("t", "", "c")
    stored = writer.next(codec, key, [BIG, {"k": "orig"}], V1)
    writer.remember(key, stored)
    links = tuple((name, codec.decode(payload)) for name, _, payload in stored.links)
    value = [BIG, links[0][1].items[1]]
    writer.remember_read("t", "", {"c": links}, {"c": value},
                         {name: payload for name, _, payload in stored.links})
    known = writer.current(key, V1)
    assert known is not None and known.digests == stored.digests
    value[1]["k"] = "mutated"  # still checked: the digests are of the stored bytes
    assert len(writer.next(codec, key, [*value, "c"], V2).links) == 1
    other = writer.next(codec, ("t", "", "c"), [BIG, {"k": "orig"}, "c"], V2)
    assert [n for n, _, _ in other.links] == ["~0~c", "~1~c"]


def test_a_chain_read_with_other_links_is_learned_again(codec: Codec) -> None:
    writer = ChainWriter(max_deltas=8)
    key = ("t", "", "c")
    writer.remember(key, writer.next(codec, key, [BIG, "a"], V1))
    other = ChainWriter(max_deltas=8).next(codec, key, [BIG, "b"], V1)  # another process
    links = tuple((name, codec.decode(payload)) for name, _, payload in other.links)
    writer.remember_read("t", "", {"c": links}, {"c": [BIG, "b"]},
                         {name: payload for name, _, payload in other.links})
    known = writer.current(key, V1)
    assert known is not None and known.digests is None and known.items == (BIG, "b")
