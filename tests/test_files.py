"""Files written whole: never cut off, never shared between writers, never a device replaced."""

import os
import subprocess
import sys
import threading

from distsent.files import tidy_staged_files, write_whole
from tests.conftest import REPO


def test_a_file_is_replaced_whole_and_keeps_its_permissions(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")
    target.chmod(0o640)
    write_whole(target, "new \u00e9")
    assert target.read_bytes() == "new \u00e9".encode()  # UTF-8 whatever the locale
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(path.name for path in tmp_path.iterdir()) == ["summary.json"]  # no staging left
    write_whole(tmp_path / "new" / "folder" / "x.jsonl", "made")
    assert (tmp_path / "new" / "folder" / "x.jsonl").read_text() == "made"


def test_a_link_writes_the_file_it_names_and_a_device_is_written_into(tmp_path):
    real = tmp_path / "real.jsonl"
    real.write_text("old")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    write_whole(link, "through the link")
    assert link.is_symlink() and real.read_text() == "through the link"
    # Renaming onto /dev/null would replace the device for every process on the machine.
    write_whole(os.devnull, "discarded")
    assert os.path.exists(os.devnull) and not os.path.isfile(os.devnull)
    # /dev/stdout of a shell's `>> log`: written into the open file, not renamed over it.
    log = tmp_path / "log.txt"
    log.write_text("earlier lines\n")
    script = "import sys; from distsent.files import write_whole; write_whole('/dev/stdout', 'predictions\\n')"
    with log.open("a") as handle:
        subprocess.run([sys.executable, "-c", script], stdout=handle, check=True, cwd=REPO)
    assert log.read_text() == "earlier lines\npredictions\n"
    piped = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert piped.returncode == 0 and piped.stdout == "predictions\n", piped.stderr


def test_staging_files_a_kill_left_are_tidied(tmp_path):
    (tmp_path / ".summary.json.tmp-0badf00d").write_text("cut off")
    (tmp_path / ".best.tmp-0badf00d").mkdir()  # an export's staging folder: not this tidy's
    assert tidy_staged_files(tmp_path) == [
        f"removed {tmp_path / '.summary.json.tmp-0badf00d'}, left by an interrupted write"
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == [".best.tmp-0badf00d"]


def test_writers_of_one_path_never_share_a_staging_file(tmp_path):
    target = tmp_path / "heldout.misclassified.jsonl"
    texts = [f"{n}\n" * 20_000 for n in range(8)]
    errors = []

    def write(text):
        try:
            for _ in range(5):
                write_whole(target, text)
        except OSError as error:  # a shared staging name made these: renamed away, cut off
            errors.append(error)

    threads = [threading.Thread(target=write, args=(text,)) for text in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert target.read_text() in texts  # one writer's whole text, not a mix
    assert sorted(path.name for path in tmp_path.iterdir()) == [target.name]
