"""
The nginx sites of C{deploy/nginx/}, read and run as the tests (and
C{bench/replicas.py}) need them. Standard library only: the benchmark's
harness imports it too.
"""

import os
import re
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The site in front of several replicas.
REPLICAS_SITE = os.path.join(ROOT, "deploy", "nginx", "relay-replicas.conf")


class NginxSite:
    """An nginx site's directives, one line each, comments left out."""

    def __init__(self, path=None, text=None):
        if text is None:
            with open(path) as f:
                text = f.read()
        self.conf = text
        self.directives = {}
        self.lines = []
        for line in self.conf.splitlines():
            line = line.split("#", 1)[0].strip().rstrip(";")
            if line:
                self.lines.append(" ".join(line.split()))
                key, _, value = line.partition(" ")
                self.directives.setdefault(key, []).append(value.strip())

    @classmethod
    def from_configmap(cls, configmaps):
        (configmap,) = configmaps
        (text,) = configmap["data"].values()
        return cls(text=text)

    def upstream_servers(self, upstream: str):
        """The servers of one upstream block, as written (the replicas' ring hashes this text)."""
        block = re.search(r"upstream %s \{(.*?)\}" % re.escape(upstream), self.conf, re.S).group(1)
        return re.findall(r"^\s*server\s+(\S+?)[\s;]", block, re.M)

    def settings(self):
        """Every line but those that differ between one machine and a cluster."""
        return [
            line
            for line in self.lines
            if not re.match(r"(listen|ssl_certificate|ssl_certificate_key) ", line)
            and not re.match(r"server \S+ max_fails=", line)
        ]

    def plain_http(self, folder: str, http_port: int, h2c_port: int, upstreams=None) -> str:
        """
        The site as a complete nginx.conf in C{folder}, listening on
        127.0.0.1 with plain HTTP/1.1 on C{http_port} and h2c on
        C{h2c_port} instead of TLS (a throw-away certificate is more than
        the tests need), with C{upstreams} in place of the upstream servers
        when given; the path of the file.
        """
        site = self.conf
        listens = "listen 127.0.0.1:%d;" % http_port
        if h2c_port:
            listens += " listen 127.0.0.1:%d http2;" % h2c_port
        site = re.sub(r"\n\s*listen \[::\][^;]*;", "", site)
        site = re.sub(r"listen [^;]*;", listens, site, count=1)
        site = re.sub(r"\n\s*ssl_certificate\S* [^;]*;", "", site)
        if upstreams is not None:
            site = re.sub(r"upstream \S+ \{.*?\}", lambda m: _with_servers(m.group(0), upstreams), site, flags=re.S)
        path = os.path.join(folder, "nginx.conf")
        with open(path, "w") as f:
            f.write(
                "daemon off;\nmaster_process off;\npid %(d)s/nginx.pid;\nerror_log %(d)s/error.log;\n"
                "events {}\nhttp {\naccess_log off;\nclient_body_temp_path %(d)s;\nproxy_temp_path %(d)s;\n"
                "fastcgi_temp_path %(d)s;\nuwsgi_temp_path %(d)s;\nscgi_temp_path %(d)s;\n%(site)s\n}\n"
                % {"d": folder, "site": site}
            )
        return path


def _with_servers(block: str, servers) -> str:
    """An upstream block with C{servers} instead of its own, each with the first one's parameters."""
    lines = block.split("\n")
    own = [i for i, line in enumerate(lines) if re.match(r"\s*server\s", line)]
    prefix, _, parameters = re.match(r"(\s*server\s+)(\S+?)(\s.*|;)$", lines[own[0]]).groups()
    new = [prefix + server + parameters for server in servers]
    return "\n".join(lines[: own[0]] + new + [line for i, line in enumerate(lines[own[0] :], own[0]) if i not in own])


def find_nginx():
    """Debian's nginx, or None (.ci/run installs nginx-light)."""
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
