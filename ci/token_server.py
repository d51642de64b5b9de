#!/usr/bin/env python3
"""Bearer-token server of the peerd lab's TLS registry (stdlib + cryptography).

It answers the Docker token protocol the way a public registry does:

  GET  /token?service=S&scope=repository:NAME:pull[&scope=...]      (anonymous, or HTTP Basic)
  POST /token   grant_type=password&username=U&password=P&service=S&scope=...   (OAuth2 form)

and returns {"token", "access_token", "expires_in", "issued_at"}. The token is a JWT signed with
RS256 whose `x5c` header carries the signing certificate; the registry trusts that certificate
(its `auth.token.rootcertbundle`), checks `iss`, `aud` (= the service), the times and the `access`
claim.

Who gets what is read from the mode file on every request:

  anonymous   (default) anyone gets `pull`; users of the credentials file get `pull` and `push`
  users       only users of the credentials file get a token; anonymous requests get 401
  none        nobody gets a token: 403

One JSON line per request goes to --log: time, client, method, user agent, user, requested and
granted scopes, status.

  token_server.py --listen 198.18.0.3:5444 --tls-cert server.crt --tls-key server.key \
      --sign-cert token-signer.crt --sign-key token-signer.key --issuer I --service S \
      --credentials FILE --mode-file FILE --log FILE
"""

import argparse
import base64
import hmac
import json
import signal
import ssl
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

TOKEN_TTL = 300
USER_ACTIONS = ("pull", "push")
ANON_ACTIONS = ("pull",)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def parse_scopes(values):
    """`repository:name:pull,push` (several per value, space-separated) -> [(type, name, [actions])].
    The name may hold a ':' (`repository:host:5000/x:pull`); the actions follow the last one."""
    out = []
    for value in values:
        for scope in value.split():
            typ, sep, rest = scope.partition(":")
            name, sep2, actions = rest.rpartition(":")
            if not sep or not sep2 or not typ or not name:
                continue
            out.append((typ, name, [a for a in actions.split(",") if a]))
    return out


class Signer:
    def __init__(self, cert_path, key_path, issuer, service):
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            self.key = serialization.load_pem_private_key(f.read(), password=None)
        self.x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        self.issuer = issuer
        self.service = service

    def token(self, subject, access):
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": self.x5c}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + TOKEN_TTL,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = b64url(json.dumps(header, separators=(",", ":")).encode()) + "." + b64url(
            json.dumps(claims, separators=(",", ":")).encode()
        )
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64url(sig), now


class State:
    def __init__(self, args):
        self.signer = Signer(args.sign_cert, args.sign_key, args.issuer, args.service)
        self.credentials_file = args.credentials
        self.mode_file = args.mode_file
        self.log_path = args.log
        self.log_lock = threading.Lock()

    def mode(self):
        try:
            with open(self.mode_file) as f:
                m = f.read().strip()
        except OSError:
            return "anonymous"
        return m if m in ("anonymous", "users", "none") else "anonymous"

    def check_user(self, user, password):
        try:
            with open(self.credentials_file) as f:
                lines = f.read().splitlines()
        except OSError:
            return False
        for line in lines:
            u, sep, p = line.partition(":")
            if sep and hmac.compare_digest(u, user) and hmac.compare_digest(p, password):
                return True
        return False

    def log(self, entry):
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self.log_lock:
            with open(self.log_path, "a") as f:
                f.write(line)


class Handler(BaseHTTPRequestHandler):
    server_version = "peerd-lab-token-server/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # the JSON log replaces the default stderr line
        pass

    def _reply(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _basic_user(self):
        """(user, password) from an Authorization: Basic header, or None."""
        auth = self.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return ("", "")
        return user, password

    def _serve(self, form, creds, oauth):
        st = self.server.state
        scopes = parse_scopes(form.get("scope", []))
        mode = st.mode()
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "client": self.client_address[0],
            "method": self.command,
            "user_agent": self.headers.get("User-Agent", ""),
            "user": creds[0] if creds else None,
            "service": (form.get("service") or [""])[0],
            "scope": [f"{t}:{n}:{','.join(a)}" for t, n, a in scopes],
            "mode": mode,
        }
        status, body, headers = 200, None, []
        if mode == "none":
            status, body = 403, {"errors": [{"code": "DENIED", "message": "the token server refuses every token"}]}
        elif creds is not None and not st.check_user(*creds):
            status = 401
            body = {"errors": [{"code": "UNAUTHORIZED", "message": "bad user name or password"}]}
            headers = [("WWW-Authenticate", 'Basic realm="peerd-lab"')]
        elif creds is None and mode == "users":
            status = 401
            body = {"errors": [{"code": "UNAUTHORIZED", "message": "anonymous tokens are switched off"}]}
            headers = [("WWW-Authenticate", 'Basic realm="peerd-lab"')]
        else:
            allowed = USER_ACTIONS if creds is not None else ANON_ACTIONS
            access = []
            for typ, name, actions in scopes:
                if typ != "repository":
                    continue
                wanted = USER_ACTIONS if "*" in actions else actions
                granted = [a for a in wanted if a in allowed]
                access.append({"type": "repository", "name": name, "actions": granted})
            token, issued = st.signer.token(creds[0] if creds else "", access)
            body = {
                "token": token,
                "access_token": token,
                "expires_in": TOKEN_TTL,
                "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(issued)),
            }
            if oauth:
                body["scope"] = " ".join(f"repository:{a['name']}:{','.join(a['actions'])}" for a in access)
            entry["granted"] = [f"repository:{a['name']}:{','.join(a['actions'])}" for a in access]
        entry["status"] = status
        st.log(entry)
        self._reply(status, body, headers)

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path != "/token":
            self._reply(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]})
            return
        self._serve(parse_qs(url.query), self._basic_user(), oauth=False)

    def do_POST(self):
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if 0 < length <= 1 << 16 else b""
        if url.path != "/token":
            self._reply(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]})
            return
        form = parse_qs(raw.decode("utf-8", "replace"))
        grant = (form.get("grant_type") or [""])[0]
        if grant != "password":
            # containerd asks for refresh tokens only when told to; nothing else is supported.
            self._reply(400, {"error": "unsupported_grant_type"})
            return
        creds = ((form.get("username") or [""])[0], (form.get("password") or [""])[0])
        self._serve(form, creds, oauth=True)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, state, tls):
        super().__init__(addr, Handler)
        self.state = state
        self.tls = tls

    def finish_request(self, request, client_address):
        # The TLS handshake runs in the request's thread: a client that never finishes it cannot
        # hold up the others.
        request.settimeout(30)
        try:
            request = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        super().finish_request(request, client_address)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True, help="host:port")
    ap.add_argument("--tls-cert", required=True)
    ap.add_argument("--tls-key", required=True)
    ap.add_argument("--sign-cert", required=True)
    ap.add_argument("--sign-key", required=True)
    ap.add_argument("--issuer", required=True)
    ap.add_argument("--service", required=True)
    ap.add_argument("--credentials", required=True, help="file of user:password lines")
    ap.add_argument("--mode-file", required=True, help="anonymous | users | none (absent: anonymous)")
    ap.add_argument("--log", required=True)
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    tls.load_cert_chain(args.tls_cert, args.tls_key)
    server = Server((host, int(port)), State(args), tls)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    sys.stderr.write(f"token server listening on https://{host}:{port}/token\n")
    sys.stderr.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
