#!/usr/bin/env python3
"""Prints a fully authenticated session token for the demo administrator: logs in with the
password `dalp up --demo` printed, then enrols TOTP and confirms it with a code computed
here (RFC 6238) — or, when $DALP_TOTP_SECRET holds an enrolled secret, answers the second
factor with it. Standard library only.

usage: api-session.py BASE_URL EMAIL PASSWORD
"""
import base64, hashlib, hmac, json, os, struct, sys, time, urllib.request


def call(base, method, path, token=None, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def totp(secret_b32, at=None):
    key = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
    counter = int((at or time.time()) // 30)
    mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    off = mac[-1] & 0x0F
    code = (struct.unpack(">I", mac[off:off + 4])[0] & 0x7FFFFFFF) % 1_000_000
    return f"{code:06d}"


def main():
    base, email, password = sys.argv[1:4]
    login = call(base, "POST", "/api/v1/auth/login", body={"email": email, "password": password})
    token = login["token"]
    secret = os.environ.get("DALP_TOTP_SECRET")
    if secret:
        call(base, "POST", "/api/v1/auth/mfa/verify", token, {"code": totp(secret)})
    else:
        secret = call(base, "POST", "/api/v1/mfa/totp", token)["secret"]
        call(base, "POST", "/api/v1/mfa/totp/confirm", token, {"code": totp(secret)})
    print(token)


if __name__ == "__main__":
    main()
