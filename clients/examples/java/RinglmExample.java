// A ringlm client in Java: tokenize a text, run a seeded generate, stream the same request, print JSON.
//
//   java -jar build/ringlm-example.jar --port 9090 --text "Hello" [--max-tokens 16 --temperature 0.8 --seed 7]
//        [--tls --ca ca.pem --cert client.pem --key client.key] [--token TOKEN]
//
// The org.ringlm classes are generated from idl/ringlm.thrift by `make clients`; the token may also come from
// RINGLM_AUTH_TOKEN, so that it need not show in the process list.
package org.ringlm.example;

import java.io.ByteArrayInputStream;
import java.net.Socket;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyFactory;
import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.cert.Certificate;
import java.security.cert.CertificateFactory;
import java.security.spec.PKCS8EncodedKeySpec;
import java.util.Base64;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.stream.Collectors;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLSocket;
import javax.net.ssl.TrustManagerFactory;

import org.apache.thrift.TConfiguration;
import org.apache.thrift.TException;
import org.apache.thrift.protocol.TBinaryProtocol;
import org.apache.thrift.transport.TSocket;
import org.apache.thrift.transport.TTransport;
import org.apache.thrift.transport.layered.TFramedTransport;
import org.ringlm.Cancelled;
import org.ringlm.DeadlineExceeded;
import org.ringlm.GenerateRequest;
import org.ringlm.GenerateResult;
import org.ringlm.Generator;
import org.ringlm.InvalidRequest;
import org.ringlm.ModelError;
import org.ringlm.Overloaded;
import org.ringlm.SamplingOptions;
import org.ringlm.StreamChunk;
import org.ringlm.Unauthorized;

public final class RinglmExample {
  private static final int CONNECT_TIMEOUT_MS = 10_000;
  private static final int READ_TIMEOUT_MS = 60_000;   // longer than next_chunk's 1 s long poll and a busy generate

  public static void main(String[] args) {
    int status;
    try {
      status = run(parse(args));
    } catch (InvalidRequest e) {
      print("{\"error\":\"InvalidRequest\",\"field\":" + quoted(e.getField()) + ",\"message\":"
          + quoted(e.getMessage()) + "}");
      status = 1;
    } catch (Overloaded e) {
      print("{\"error\":\"Overloaded\",\"message\":" + quoted(e.getMessage()) + ",\"retry_after_ms\":"
          + e.getRetry_after_ms() + ",\"draining\":" + e.isDraining() + "}");
      status = 1;
    } catch (Unauthorized | ModelError | DeadlineExceeded | Cancelled e) {
      print("{\"error\":" + quoted(e.getClass().getSimpleName()) + ",\"message\":" + quoted(e.getMessage()) + "}");
      status = 1;
    } catch (TException e) {   // the connection: refused, closed, timed out, or not a Thrift server
      print("{\"error\":\"TransportError\",\"message\":" + quoted(String.valueOf(e.getMessage())) + "}");
      status = 1;
    } catch (Exception e) {    // a malformed flag, an unreadable certificate
      print("{\"error\":\"UsageError\",\"message\":" + quoted(String.valueOf(e)) + "}");
      status = 1;
    }
    System.exit(status);
  }

  private static int run(Map<String, String> flags) throws Exception {
    // ringlm speaks the framed transport with the strict binary protocol, in TLS or not.
    try (TTransport transport = new TFramedTransport(openSocket(flags))) {
      if (!transport.isOpen()) {
        transport.open();
      }
      Generator.Client client = new Generator.Client(new TBinaryProtocol(transport));
      String token = flags.get("token");
      if (token != null && !token.isEmpty()) {
        client.authenticate(token);
      }
      String text = flags.get("text");
      List<Integer> textIds = client.tokenize(text, true, false);
      GenerateResult result = client.generate(request(flags));

      // The same seeded request, streamed: next_chunk long-polls until the last chunk (done) brings the result.
      String streamId = client.open_stream(request(flags));
      StringBuilder streamed = new StringBuilder();
      StreamChunk chunk;
      do {
        chunk = client.next_chunk(streamId, 1000);
        streamed.append(chunk.getText());
      } while (!chunk.isDone());

      print("{\"text_ids\":" + array(textIds) + ",\"generate\":{\"token_ids\":" + array(result.getToken_ids())
          + ",\"text\":" + quoted(result.getText()) + "},\"stream\":{\"text\":" + quoted(streamed.toString())
          + ",\"token_ids\":" + array(chunk.getResult().getToken_ids()) + "}}");
      return 0;
    }
  }

  private static GenerateRequest request(Map<String, String> flags) {
    SamplingOptions sampling = new SamplingOptions()
        .setTemperature(Double.parseDouble(flags.get("temperature")))
        .setSeed(Long.parseLong(flags.get("seed")));
    return new GenerateRequest()
        .setPrompt(flags.get("text"))
        .setMax_tokens(Integer.parseInt(flags.get("max-tokens")))
        .setSampling(sampling);
  }

  private static TSocket openSocket(Map<String, String> flags) throws Exception {
    String host = flags.get("host");
    int port = Integer.parseInt(flags.get("port"));
    if (!flags.containsKey("tls")) {
      return new TSocket(new TConfiguration(), host, port, READ_TIMEOUT_MS, CONNECT_TIMEOUT_MS);
    }
    SSLSocket socket = (SSLSocket) tlsContext(flags).getSocketFactory().createSocket();
    // Check the server's certificate names this host (Java does so for HTTPS, not for a bare socket).
    SSLParameters parameters = socket.getSSLParameters();
    parameters.setEndpointIdentificationAlgorithm("HTTPS");
    socket.setSSLParameters(parameters);
    socket.connect(new java.net.InetSocketAddress(host, port), CONNECT_TIMEOUT_MS);
    socket.setSoTimeout(READ_TIMEOUT_MS);
    socket.setTcpNoDelay(true);
    return new TSocket((Socket) socket);
  }

  // An SSLContext from PEM files, as ringlm's servers and the Python client use them (Thrift's own
  // TSSLTransportFactory wants Java key stores instead).
  private static SSLContext tlsContext(Map<String, String> flags) throws Exception {
    CertificateFactory certificates = CertificateFactory.getInstance("X.509");
    TrustManagerFactory trust = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
    if (flags.containsKey("ca")) {
      KeyStore store = KeyStore.getInstance(KeyStore.getDefaultType());
      store.load(null, null);
      int i = 0;
      for (Certificate ca : certificates.generateCertificates(Files.newInputStream(Path.of(flags.get("ca"))))) {
        store.setCertificateEntry("ca" + i++, ca);
      }
      trust.init(store);
    } else {
      trust.init((KeyStore) null);   // the JDK's trusted authorities
    }
    KeyManagerFactory keys = null;
    if (flags.containsKey("cert")) {
      KeyStore store = KeyStore.getInstance(KeyStore.getDefaultType());
      store.load(null, null);
      Certificate[] chain = certificates.generateCertificates(Files.newInputStream(Path.of(flags.get("cert"))))
          .toArray(new Certificate[0]);
      store.setKeyEntry("client", privateKey(Path.of(flags.get("key"))), new char[0], chain);
      keys = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
      keys.init(store, new char[0]);
    }
    SSLContext context = SSLContext.getInstance("TLS");
    context.init(keys == null ? null : keys.getKeyManagers(), trust.getTrustManagers(), null);
    return context;
  }

  /** An unencrypted PKCS#8 key ("BEGIN PRIVATE KEY", what `openssl req -nodes` writes), RSA or EC. */
  private static PrivateKey privateKey(Path file) throws Exception {
    String pem = Files.readString(file);
    String body = pem.replaceAll("-----[A-Z ]+-----", "").replaceAll("\\s", "");
    PKCS8EncodedKeySpec spec = new PKCS8EncodedKeySpec(Base64.getDecoder().decode(body));
    try {
      return KeyFactory.getInstance("RSA").generatePrivate(spec);
    } catch (java.security.spec.InvalidKeySpecException notRsa) {
      return KeyFactory.getInstance("EC").generatePrivate(spec);
    }
  }

  /** --name value, --name=value (for values that start with a dash) and the bare --tls, over the defaults. */
  private static Map<String, String> parse(String[] args) {
    Map<String, String> flags = new HashMap<>(Map.of("host", "127.0.0.1", "port", "9090",
        "text", "The quick brown fox", "max-tokens", "16", "temperature", "0.8", "seed", "7"));
    String token = System.getenv("RINGLM_AUTH_TOKEN");
    if (token != null) {
      flags.put("token", token);
    }
    for (int i = 0; i < args.length; i++) {
      String arg = args[i];
      if (arg.equals("--tls")) {
        flags.put("tls", "");
      } else if (arg.startsWith("--") && arg.contains("=")) {
        flags.put(arg.substring(2, arg.indexOf('=')), arg.substring(arg.indexOf('=') + 1));
      } else if (arg.startsWith("--") && i + 1 < args.length) {
        flags.put(arg.substring(2), args[++i]);
      } else {
        throw new IllegalArgumentException("unexpected argument " + arg);
      }
    }
    return flags;
  }

  private static String array(List<Integer> ids) {
    return ids.stream().map(String::valueOf).collect(Collectors.joining(",", "[", "]"));
  }

  /** A JSON string literal; characters outside ASCII pass as they are (stdout is UTF-8). */
  private static String quoted(String text) {
    StringBuilder out = new StringBuilder("\"");
    for (char c : text.toCharArray()) {
      switch (c) {
        case '"': out.append("\\\""); break;
        case '\\': out.append("\\\\"); break;
        case '\n': out.append("\\n"); break;
        case '\r': out.append("\\r"); break;
        case '\t': out.append("\\t"); break;
        default:
          if (c < 0x20) {
            out.append(String.format("\\u%04x", (int) c));
          } else {
            out.append(c);
          }
      }
    }
    return out.append('"').toString();
  }

  private static void print(String json) {
    // UTF-8 whatever the locale: the JSON carries the model's text as it is.
    java.io.PrintStream out = new java.io.PrintStream(new java.io.FileOutputStream(java.io.FileDescriptor.out),
        true, java.nio.charset.StandardCharsets.UTF_8);
    out.println(json);
  }
}
