// One session through a real driver, PgJDBC, for agent/drivers_test.go.
//
// usage: java -cp DIR:postgresql.jar Probe URL [key=value ...] -- [SQL ...] [++ URL ...]
//
// For each session (sessions are separated by "++", and run one after the
// other in one JVM, which takes longer to start than the sessions) it
// connects with URL and the properties, runs each SQL (autocommit) and
// prints one JSON line, as probe.py does: {"driver": "PgJDBC 42.5.5",
// "connect": {"ok": true} or the error, "results": [{"rows": [[text, ...]]}
// or the error, ...]}; an error is {"sqlstate": ..., "message": ...}.
//
// An SQL of the form "interleave:N:OUTER|INNER" runs OUTER (a
// PreparedStatement) in a transaction with fetch size N — PgJDBC binds a
// named portal and fetches N rows per Execute — and runs INNER between
// the rows it reads, so that other statements run between the portal's
// Executes; each result row is [OUTER's first column, INNER's].
//
// PgJDBC speaks TCP only; pgward listens on a Unix socket. The property
// socketFactory=Probe$UnixSocketFactory with socketFactoryArg=<socket file>
// connects PgJDBC's socket to the socket file instead (JDK 16+ Unix domain
// SocketChannel); everything above the socket is PgJDBC's own.

import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.Socket;
import java.net.SocketAddress;
import java.net.SocketException;
import java.net.UnixDomainSocketAddress;
import java.nio.channels.Channels;
import java.nio.channels.SocketChannel;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;

public class Probe {
    public static void main(String[] args) throws Exception {
        List<String> session = new ArrayList<>();
        for (String a : args) {
            if (a.equals("++")) {
                session(session.toArray(new String[0]));
                session.clear();
            } else {
                session.add(a);
            }
        }
        session(session.toArray(new String[0]));
    }

    static void session(String[] args) throws Exception {
        String url = args[0];
        Properties props = new Properties();
        int i = 1;
        for (; i < args.length && !args[i].equals("--"); i++) {
            int eq = args[i].indexOf('=');
            props.setProperty(args[i].substring(0, eq), args[i].substring(eq + 1));
        }
        StringBuilder out = new StringBuilder("{\"driver\": ");
        str(out, "PgJDBC " + org.postgresql.util.DriverInfo.DRIVER_VERSION);
        Connection conn;
        try {
            conn = DriverManager.getConnection(url, props);
        } catch (SQLException e) {
            out.append(", \"connect\": ");
            err(out, e);
            System.out.println(out.append(", \"results\": []}"));
            return;
        }
        out.append(", \"connect\": {\"ok\": true}, \"results\": [");
        boolean first = true;
        for (i++; i < args.length; i++) {
            if (!first) out.append(", ");
            first = false;
            try (Statement st = conn.createStatement()) {
                List<List<String>> rows = new ArrayList<>();
                if (args[i].startsWith("interleave:")) {
                    interleave(conn, args[i], rows);
                } else if (st.execute(args[i])) {
                    try (ResultSet rs = st.getResultSet()) {
                        int n = rs.getMetaData().getColumnCount();
                        while (rs.next()) {
                            List<String> row = new ArrayList<>();
                            for (int c = 1; c <= n; c++) row.add(rs.getString(c));
                            rows.add(row);
                        }
                    }
                }
                out.append("{\"rows\": [");
                for (int r = 0; r < rows.size(); r++) {
                    out.append(r > 0 ? ", [" : "[");
                    for (int c = 0; c < rows.get(r).size(); c++) {
                        if (c > 0) out.append(", ");
                        str(out, rows.get(r).get(c));
                    }
                    out.append("]");
                }
                out.append("]}");
            } catch (SQLException e) {
                err(out, e);
            }
        }
        conn.close();
        System.out.println(out.append("]}"));
    }

    static void interleave(Connection conn, String spec, List<List<String>> rows) throws SQLException {
        String[] parts = spec.split(":", 3);
        String[] sqls = parts[2].split("\\|", 2);
        conn.setAutoCommit(false);
        try (PreparedStatement outer = conn.prepareStatement(sqls[0]);
             PreparedStatement inner = conn.prepareStatement(sqls[1])) {
            outer.setFetchSize(Integer.parseInt(parts[1]));
            try (ResultSet rs = outer.executeQuery()) {
                while (rs.next()) {
                    List<String> row = new ArrayList<>();
                    row.add(rs.getString(1));
                    try (ResultSet irs = inner.executeQuery()) {
                        irs.next();
                        row.add(irs.getString(1));
                    }
                    rows.add(row);
                }
            }
            conn.commit();
        } finally {
            if (!conn.isClosed()) {
                try {
                    conn.rollback();
                } catch (SQLException e) {
                    // The transaction is already over.
                }
                conn.setAutoCommit(true);
            }
        }
    }

    static void err(StringBuilder out, SQLException e) {
        String msg = e.getMessage();
        if (e instanceof org.postgresql.util.PSQLException) {
            org.postgresql.util.ServerErrorMessage sem = ((org.postgresql.util.PSQLException) e).getServerErrorMessage();
            if (sem != null) msg = sem.getMessage();
        }
        out.append("{\"sqlstate\": ");
        str(out, e.getSQLState() == null ? "" : e.getSQLState());
        out.append(", \"message\": ");
        str(out, msg);
        out.append("}");
    }

    static void str(StringBuilder out, String s) {
        if (s == null) {
            out.append("null");
            return;
        }
        out.append('"');
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') out.append('\\').append(c);
            else if (c < 0x20) out.append(String.format("\\u%04x", (int) c));
            else out.append(c);
        }
        out.append('"');
    }

    // UnixSocketFactory makes PgJDBC's sockets connect to the Unix socket
    // file given as socketFactoryArg, whatever host and port the URL names.
    public static class UnixSocketFactory extends javax.net.SocketFactory {
        private final String path;

        public UnixSocketFactory(String path) {
            this.path = path;
        }

        @Override
        public Socket createSocket() {
            return new UnixSocket(path);
        }

        @Override
        public Socket createSocket(String host, int port) throws IOException {
            Socket s = createSocket();
            s.connect(null, 0);
            return s;
        }

        @Override
        public Socket createSocket(String host, int port, InetAddress localHost, int localPort) throws IOException {
            return createSocket(host, port);
        }

        @Override
        public Socket createSocket(InetAddress host, int port) throws IOException {
            return createSocket(host.getHostName(), port);
        }

        @Override
        public Socket createSocket(InetAddress address, int port, InetAddress localAddress, int localPort) throws IOException {
            return createSocket(address.getHostName(), port);
        }
    }

    // UnixSocket is the java.net.Socket PgJDBC uses, over a Unix domain
    // SocketChannel: the streams, connect and close are real; the TCP options
    // PgJDBC sets (no delay, keepalive, timeouts) have no meaning on it.
    static class UnixSocket extends Socket {
        private final String path;
        private SocketChannel ch;
        private InputStream in;
        private OutputStream out;
        private int soTimeout;

        UnixSocket(String path) {
            this.path = path;
        }

        @Override
        public void connect(SocketAddress ignored) throws IOException {
            connect(ignored, 0);
        }

        @Override
        public void connect(SocketAddress ignored, int timeout) throws IOException {
            ch = SocketChannel.open(UnixDomainSocketAddress.of(path));
            in = Channels.newInputStream(ch);
            out = Channels.newOutputStream(ch);
        }

        @Override
        public boolean isConnected() {
            return ch != null && ch.isConnected();
        }

        @Override
        public boolean isClosed() {
            return ch != null && !ch.isOpen();
        }

        @Override
        public InputStream getInputStream() throws IOException {
            if (in == null) throw new SocketException("not connected");
            return in;
        }

        @Override
        public OutputStream getOutputStream() throws IOException {
            if (out == null) throw new SocketException("not connected");
            return out;
        }

        @Override
        public synchronized void close() throws IOException {
            if (ch != null) ch.close();
        }

        @Override
        public void setTcpNoDelay(boolean on) {}

        @Override
        public void setKeepAlive(boolean on) {}

        @Override
        public synchronized void setSoTimeout(int timeout) {
            soTimeout = timeout;
        }

        @Override
        public synchronized int getSoTimeout() {
            return soTimeout;
        }

        @Override
        public synchronized void setReceiveBufferSize(int size) {}

        @Override
        public synchronized void setSendBufferSize(int size) {}
    }
}
