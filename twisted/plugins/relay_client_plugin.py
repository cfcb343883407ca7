from twisted.application.service import ServiceMaker

relay_client = ServiceMaker(
    "relay-client",
    "relay.client.tap",
    "The relay client: serves a backend through a relay server (Cloud Robotics http-relay-client compatible).",
    "relay-client",
)
