def test_roundtrip(storage_root):
    loc = storage_root / "a" / "b.txt"
    loc.write_text("hi")
    assert loc.read_text() == "hi"
    assert storage_root.list_names() == ["a"]
    assert (storage_root / "a").list_names() == ["b.txt"]
    assert storage_root.walk_files() == ["a/b.txt"]
    (storage_root / "a").remove(recursive=True)
    assert not loc.exists()
