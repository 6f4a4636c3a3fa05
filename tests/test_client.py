"""`lockstep client` against servers that answer as lockstep would not, and before it calls."""
import threading

import pytest

from tests.servers import free_port


@pytest.fixture
def fake_server():
    """A server that answers /v1/chat as lockstep would not: `mode` is 503, garbage or noend."""
    import http.server
    mode = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            while size := int(self.rfile.readline().split(b";")[0], 16):  # the chunked upload, to its end
                self.rfile.read(size + 2)
            self.rfile.readline()
            if mode["mode"] == "503":
                self.send_response(503)
                self.send_header("Content-Length", "4")
                self.end_headers()
                self.wfile.write(b"busy")
                return
            self.send_response(200)
            if mode["mode"] == "abort":  # promises more than it sends, then hangs up
                self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"<html>hello</html>\n" if mode["mode"] == "garbage"
                             else b'{"type":"text","frame":0,"text":"hi"}\n')

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", mode
    srv.shutdown()


@pytest.mark.parametrize("mode, said", [("503", "server answered 503: busy"),
                                        ("garbage", "answered something that is not lockstep's event stream"),
                                        ("noend", "stream broke off after 0 frames, before its end event"),
                                        ("abort", "ClientPayloadError")])
def test_client_command_says_why_a_call_failed(fake_server, mode, said, wav_inputs, tmp_path, capsys):
    from engine.cli import main
    url, state = fake_server
    state["mode"] = mode
    with pytest.raises(SystemExit) as exc:
        main(["client", url, str(wav_inputs[0]), "--output", str(tmp_path / "r.wav"), "--no-pace"])
    assert exc.value.code == 1 and said in capsys.readouterr().err
    if mode in ("noend", "abort"):  # what came is kept
        assert (tmp_path / "r.txt").read_text() == "hi\n"


def test_client_command_refuses_what_it_cannot_do_before_calling(wav_inputs, tmp_path, capsys):
    from engine.cli import main
    wav = str(wav_inputs[0])
    for argv, said in [([f"http://127.0.0.1:{free_port()}", wav, "--output", str(tmp_path / "a.wav")], "cannot talk to"),
                       (["127.0.0.1:8998", wav, "--output", str(tmp_path / "a.wav")], "as http://HOST:PORT"),
                       (["http://127.0.0.1:1", str(tmp_path / "none.wav"), "--output", str(tmp_path / "a.wav")],
                        "cannot read"),
                       (["http://127.0.0.1:1", wav, "--output", str(tmp_path / "a.txt")], "transcript goes beside"),
                       (["http://127.0.0.1:1", wav, "--output", str(tmp_path / "no" / "a.wav")],
                        "is not a writable folder"),
                       (["http://127.0.0.1:1", wav, "--output", ""], "name a file to write"),
                       (["http://127.0.0.1:1", wav, "--output", str(tmp_path)], "name a file to write"),
                       (["http://127.0.0.1:99999", wav, "--output", str(tmp_path / "a.wav")],
                        "is not a server address")]:
        with pytest.raises(SystemExit) as exc:
            main(["client", *argv, "--no-pace"])
        assert exc.value.code == 1 and said in capsys.readouterr().err, argv
