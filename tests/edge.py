"""Clients of a running suite's edge, over REST and native gRPC."""

import http.client
import json
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class EdgeClient:
    """HTTPS client of the edge that trusts only the suite's own CA."""

    def __init__(self, port: int, ca_file: Path) -> None:
        self.port = port
        self.context = ssl.create_default_context(cafile=str(ca_file))
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ca_file = ca_file

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        connection = http.client.HTTPSConnection(
            "localhost", self.port, context=self.context, timeout=60
        )
        sent = dict(headers or {})
        payload = None
        if isinstance(body, bytes):
            payload = body
        elif body is not None:
            payload = json.dumps(body).encode()
            sent.setdefault("content-type", "application/json")
        try:
            connection.request(method, path, body=payload, headers=sent)
            reply = connection.getresponse()
            data = reply.read()
            received = {
                key.lower(): value for key, value in reply.getheaders()
            }
        finally:
            connection.close()

        return Response(reply.status, received, data)

    def channel(self) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(self.ca_file.read_bytes())

        return grpc.secure_channel(f"localhost:{self.port}", credentials)
