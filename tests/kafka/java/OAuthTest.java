// SASL/OAUTHBEARER with the reference client (kafka-clients 4.4.0) against a secured tidewater:
// the Java counterpart of test_confluent_secure.py's OAUTHBEARER test. Compiled by
// scripts/kafka-deps, run by scripts/kafka-clients-test --only java-secure (tidewater only), which
// starts tidewater with [tls], [auth] on and [auth.jwt] holding an identity provider's JWKS, and
// sets TW_SECURE_BOOTSTRAP, TW_SECURE_HTTP, TW_SECURE_CA, TW_SECURE_ADMIN and TW_SECURE_IDP_KEY
// (tests/kafka/idp.py: the provider's ES256 key, PKCS#8 PEM).
//
// What it does:
// 1. As the admin, over HTTPS: makes a stream and grants a principal produce and consume on it
//    and consume on a group.
// 2. Plays the identity provider: signs JWTs for that principal (ES256, key id idp-1, 10 s of
//    life) into a file, a fresh one every 2 s. The clients take their token from it with Kafka's
//    own OAuthBearerLoginCallbackHandler (sasl.oauthbearer.token.endpoint.url=file:..., which
//    reads the file again at each refresh).
// 3. A KafkaProducer sends a record every 100 ms for 25 s: every send must succeed. The server
//    gives each session the token's remaining lifetime (KIP-368), so the client must
//    re-authenticate on its connections: successful-reauthentication-total > 0,
//    failed-reauthentication-total = 0.
// 4. A KafkaConsumer in the group reads every record back.
// Bounded: a watchdog exits 1 at 110 s. Exit 0 on success, 1 with "FAIL (java oauth ...)".

import java.io.InputStream;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.security.KeyFactory;
import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.Signature;
import java.security.cert.CertificateFactory;
import java.security.spec.PKCS8EncodedKeySpec;
import java.time.Duration;
import java.util.Base64;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicReference;

import javax.net.ssl.SSLContext;
import javax.net.ssl.TrustManagerFactory;

import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.Metric;
import org.apache.kafka.common.MetricName;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class OAuthTest {
    static final String BOOTSTRAP = System.getenv("TW_SECURE_BOOTSTRAP");
    static final String HTTP = System.getenv("TW_SECURE_HTTP");
    static final String CA = System.getenv("TW_SECURE_CA");
    static final String ADMIN = System.getenv("TW_SECURE_ADMIN");
    static final String IDP_KEY = System.getenv("TW_SECURE_IDP_KEY");

    static void check(boolean ok, String what) {
        if (!ok) {
            System.out.println("FAIL (java oauth): " + what);
            System.exit(1);
        }
    }

    static SSLContext tls() throws Exception {
        KeyStore trust = KeyStore.getInstance(KeyStore.getDefaultType());
        trust.load(null, null);
        try (InputStream in = Files.newInputStream(Path.of(CA))) {
            trust.setCertificateEntry("ca", CertificateFactory.getInstance("X.509").generateCertificate(in));
        }
        TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(trust);
        SSLContext ctx = SSLContext.getInstance("TLS");
        ctx.init(null, tmf.getTrustManagers(), null);
        return ctx;
    }

    /** Calls tidewater's HTTP API as the admin; the reply must be 2xx. */
    static void admin(HttpClient http, String method, String path, String body) throws Exception {
        HttpRequest req = HttpRequest.newBuilder(URI.create(HTTP + path))
            .header("Authorization", "Bearer " + ADMIN)
            .header("Content-Type", "application/json")
            .method(method, HttpRequest.BodyPublishers.ofString(body))
            .timeout(Duration.ofSeconds(30))
            .build();
        HttpResponse<String> reply = http.send(req, HttpResponse.BodyHandlers.ofString());
        check(reply.statusCode() / 100 == 2, method + " " + path + " -> " + reply.statusCode() + " " + reply.body());
    }

    static String b64(byte[] bytes) {
        return Base64.getUrlEncoder().withoutPadding().encodeToString(bytes);
    }

    /** A JWT the identity provider signs: ES256 (r||s), key id idp-1. */
    static String jwt(PrivateKey key, String sub, long lifetimeS) throws Exception {
        long now = System.currentTimeMillis() / 1000;
        String header = b64("{\"alg\":\"ES256\",\"kid\":\"idp-1\",\"typ\":\"JWT\"}".getBytes(StandardCharsets.UTF_8));
        String claims = b64(String.format(
            "{\"sub\":\"%s\",\"iss\":\"https://idp.tidewater.test\",\"aud\":\"tidewater\",\"iat\":%d,\"exp\":%d}",
            sub, now, now + lifetimeS).getBytes(StandardCharsets.UTF_8));
        Signature signer = Signature.getInstance("SHA256withECDSAinP1363Format");
        signer.initSign(key);
        signer.update((header + "." + claims).getBytes(StandardCharsets.UTF_8));
        return header + "." + claims + "." + b64(signer.sign());
    }

    static PrivateKey idpKey() throws Exception {
        String pem = Files.readString(Path.of(IDP_KEY))
            .replaceAll("-----[A-Z ]+-----", "").replaceAll("\\s", "");
        return KeyFactory.getInstance("EC").generatePrivate(new PKCS8EncodedKeySpec(Base64.getDecoder().decode(pem)));
    }

    static Properties oauth(String tokenUrl) {
        Properties p = new Properties();
        p.put("bootstrap.servers", BOOTSTRAP);
        p.put("security.protocol", "SASL_SSL");
        p.put("ssl.truststore.type", "PEM");
        p.put("ssl.truststore.location", CA);
        p.put("sasl.mechanism", "OAUTHBEARER");
        p.put("sasl.jaas.config", "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required ;");
        p.put("sasl.login.callback.handler.class",
            "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginCallbackHandler");
        p.put("sasl.oauthbearer.token.endpoint.url", tokenUrl);
        // Tokens live 10 s here: let the login refresh them that often.
        p.put("sasl.login.refresh.min.period.seconds", "1");
        p.put("sasl.login.refresh.buffer.seconds", "1");
        return p;
    }

    static double metric(Map<MetricName, ? extends Metric> metrics, String name) {
        double sum = 0;
        for (Map.Entry<MetricName, ? extends Metric> e : metrics.entrySet()) {
            if (e.getKey().name().equals(name)) {
                sum += ((Number) e.getValue().metricValue()).doubleValue();
            }
        }
        return sum;
    }

    public static void main(String[] args) throws Exception {
        check(BOOTSTRAP != null && HTTP != null && CA != null && ADMIN != null && IDP_KEY != null,
            "needs TW_SECURE_* (scripts/kafka-clients-test --only java-secure)");
        Thread watchdog = new Thread(() -> {
            try {
                Thread.sleep(110_000);
            } catch (InterruptedException e) {
                return;
            }
            System.out.println("FAIL (java oauth): watchdog: not done within 110 s");
            System.exit(1);
        });
        watchdog.setDaemon(true);
        watchdog.start();
        String suffix = Long.toString(System.nanoTime() % 1_000_000_000L);
        String topic = "tw-java-oauth-" + suffix, group = "tw-java-oauth-group-" + suffix;
        String principal = "java-idp-app-" + suffix;
        HttpClient http = HttpClient.newBuilder().sslContext(tls()).build();
        admin(http, "PUT", "/v1/streams/" + topic, "{\"partitions\": 1}");
        admin(http, "POST", "/v1/auth/acls", "{\"principal\": \"" + principal
            + "\", \"resource\": \"stream\", \"name\": \"" + topic + "\", \"operations\": [\"produce\", \"consume\"]}");
        admin(http, "POST", "/v1/auth/acls", "{\"principal\": \"" + principal
            + "\", \"resource\": \"group\", \"name\": \"" + group + "\", \"operations\": [\"consume\"]}");

        // The identity provider: a fresh 10 s token in the file every 2 s (written whole, then
        // renamed, so a refresh never reads half a token).
        PrivateKey key = idpKey();
        Path dir = Files.createTempDirectory("tw-java-oauth");
        Path token = dir.resolve("token.jwt");
        AtomicInteger issued = new AtomicInteger();
        Runnable issue = () -> {
            try {
                Path tmp = dir.resolve("token.tmp");
                Files.writeString(tmp, jwt(key, principal, 10));
                Files.move(tmp, token, StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE);
                issued.incrementAndGet();
            } catch (Exception e) {
                throw new RuntimeException(e);
            }
        };
        issue.run();
        Thread provider = new Thread(() -> {
            while (true) {
                try {
                    Thread.sleep(2_000);
                } catch (InterruptedException e) {
                    return;
                }
                issue.run();
            }
        });
        provider.setDaemon(true);
        provider.start();
        String tokenUrl = token.toUri().toString();
        // Kafka 4 reads a token endpoint only from URLs (and files) allowed explicitly.
        System.setProperty("org.apache.kafka.sasl.oauthbearer.allowed.urls", tokenUrl);
        System.setProperty("org.apache.kafka.sasl.oauthbearer.allowed.files", token.toString());

        Properties pp = oauth(tokenUrl);
        pp.put("acks", "all");
        pp.put("key.serializer", StringSerializer.class.getName());
        pp.put("value.serializer", StringSerializer.class.getName());
        int sent = 0;
        AtomicReference<Exception> failed = new AtomicReference<>();
        double reauthenticated, reauthFailed;
        try (KafkaProducer<String, String> producer = new KafkaProducer<>(pp)) {
            long end = System.currentTimeMillis() + 25_000;
            while (System.currentTimeMillis() < end) {
                producer.send(new ProducerRecord<>(topic, "k" + sent, "v" + sent), (md, e) -> {
                    if (e != null) failed.compareAndSet(null, e);
                });
                sent++;
                Thread.sleep(100);
            }
            producer.flush();
            reauthenticated = metric(producer.metrics(), "successful-reauthentication-total");
            reauthFailed = metric(producer.metrics(), "failed-reauthentication-total");
        }
        check(failed.get() == null, "a send failed: " + failed.get());
        check(reauthenticated > 0, "no re-authentication on the connections in 25 s of 10 s tokens");
        check(reauthFailed == 0, reauthFailed + " re-authentications failed");
        System.out.printf("produced %d over OAUTHBEARER with %d tokens of 10 s; %.0f re-authentications, none failed%n",
            sent, issued.get(), reauthenticated);

        Properties cp = oauth(tokenUrl);
        cp.put("group.id", group);
        cp.put("auto.offset.reset", "earliest");
        cp.put("enable.auto.commit", "false");
        cp.put("key.deserializer", StringDeserializer.class.getName());
        cp.put("value.deserializer", StringDeserializer.class.getName());
        Set<String> seen = new HashSet<>();
        try (KafkaConsumer<String, String> consumer = new KafkaConsumer<>(cp)) {
            consumer.subscribe(List.of(topic));
            long deadline = System.currentTimeMillis() + 60_000;
            while (seen.size() < sent && System.currentTimeMillis() < deadline) {
                for (ConsumerRecord<String, String> r : consumer.poll(Duration.ofMillis(500))) {
                    check(r.value().equals("v" + r.key().substring(1)), "record " + r.key() + "=" + r.value());
                    seen.add(r.key());
                }
            }
            consumer.commitSync(Duration.ofSeconds(30));
        }
        check(seen.size() == sent, "consumed " + seen.size() + " of " + sent);
        System.out.println("consumed " + sent + " in group " + group + " over OAUTHBEARER");
        System.out.println("java oauth test: ok");
        provider.interrupt();
        System.exit(0);
    }
}
