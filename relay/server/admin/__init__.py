"""
The operator's live view of a relay server: which backends'
relay-clients are connected, what is in flight, what failed lately.

  - L{relay.server.admin.stats}: the statistics the broker feeds, bounded;
  - L{relay.server.admin.status}: the C{/api/status} snapshot;
  - L{relay.server.admin.web}: the admin port's resources and token check;
  - L{relay.server.admin.service}: L{attach_admin}, which turns it all on;
  - C{static/}: the page (HTML, CSS, JS), shipped as package data.

It is off unless C{--admin_port} is given, and then listens apart from
user traffic. docs/server.md ("The admin view") is the operator's guide.
"""

from relay.server.admin.service import admin_endpoint, attach_admin
from relay.server.admin.stats import AdminStats
from relay.server.admin.web import TokenCheck

__all__ = ["AdminStats", "TokenCheck", "admin_endpoint", "attach_admin"]
